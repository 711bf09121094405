"""The response cache: RFC 9111 policy, keys, entries, and the memory and Redis stores."""
