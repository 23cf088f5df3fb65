"""ModelProxy: an OpenAI-compatible server that turns agent chat requests into exact training tokens.

Modules:
- ``server``: FastAPI app + ``ModelProxyServer`` (one uvicorn server per event loop,
  ``open_session`` / ``close_session``), re-exports ``SessionConfig``, ``SessionResult``.
- ``session``: the token state of one rollout (verl's Continuous Token builder).
- ``messages``: normalising wire messages, append-only history comparison.
- ``tool_format``: sampled ids -> OpenAI assistant message (verl's tool parser), and
  the scripted policy's text formats.
- ``sampling``: per-turn sampling parameters for a backend.
- ``schemas`` / ``errors``: the OpenAI wire format and error bodies.
- ``backends``: ``verl_server`` (training), ``hf_local`` (CPU/dev), ``scripted``
  (harness check), all implementing ``backends.base.GenerationBackend``.
"""
