"""ModelProxy: an OpenAI-compatible server that turns agent chat requests into exact training tokens.

Modules:
- ``server``: FastAPI app + ``ModelProxyServer`` (one uvicorn server per event loop,
  ``open_session`` / ``close_session``; JSON and SSE answers, ``/v1/models``,
  ``/health``, ``/metrics``), re-exports ``SessionConfig``, ``SessionResult``, ``Segment``.
- ``session``: the token state of one rollout (verl's Continuous Token builder), split
  into segments when the agent rewrites its history.
- ``messages``: normalising wire messages, append-only history comparison.
- ``tool_format``: sampled ids -> OpenAI assistant message (verl's tool parser), and
  the scripted policy's text formats.
- ``sampling``: per-turn sampling parameters for a backend.
- ``schemas`` / ``errors``: the OpenAI wire format and error bodies.
- ``metrics``: Prometheus metrics of one server.
- ``profiling``: the per-call JSONL profile log (off by default);
  ``analyze`` (``python -m model_proxy.analyze LOGDIR``): its stats JSON and histograms.
- ``backends``: ``verl_server`` (training), ``hf_local`` (CPU/dev), ``scripted``
  (harness check), all implementing ``backends.base.GenerationBackend``.
"""
