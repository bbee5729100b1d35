"""``agentflow serve``: SGLang's HTTP protocol over any agentflow inference engine (the local
transformers engine by default), so the remote path runs for real without SGLang.

Not here: the client of such servers (``remote/``), the engine it serves (``local/`` by default).
"""

from agentflow.engines.serve.server import ServerConfig, build_app, serve_main

__all__ = ["ServerConfig", "build_app", "serve_main"]
