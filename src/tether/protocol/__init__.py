"""A2A wire formats: 1.0 ProtoJSON, the 0.3 mapping, JSON-RPC envelopes, error codes."""
