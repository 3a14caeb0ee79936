"""What a fairkv server reports: ``report`` (``/server_info``, the log line, live profile, plan drift),
``live_traffic`` (the served prompts and the sampled per-layer balance), ``prometheus`` (the gauges).
Host-side; nothing here runs inside a forward."""
