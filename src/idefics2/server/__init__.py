"""The HTTP server over the engine (`idefics2 serve`): OpenAI's chat completions API, text-generation-
inference's routes, Prometheus metrics and a chat page. Modules: app.py (the app, its guard and the plain
routes), openai.py and tgi.py (the two APIs), running.py (what they share), media.py (image URLs),
remote.py (fetching http(s) images without server-side request forgery), metrics.py, errors.py,
static/chat.html; process.py runs `idefics2 serve` in a child process (for scripts, benchmarks, tests)."""

from idefics2.server.app import ServerSettings, create_app, run_server

__all__ = ["ServerSettings", "create_app", "run_server"]
