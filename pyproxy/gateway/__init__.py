"""The gateway: several upstreams, routing by model, balancing, failover, ejection, key injection.

The deciding parts are sans-I/O and unit-tested without sockets:
``config`` (the tables of the config file, validated), ``models`` (the model
table, aliases, routing a request to its deployments, the body rewrite),
``balancer`` (choosing a deployment), ``outlier`` (ejection, cooling after a
429, the retry budget). ``relay`` is the thin I/O around them: one pool per
upstream and the attempt loop; ``probe`` runs the active checks.
"""
