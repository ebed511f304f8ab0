"""An OpenAI-compatible chat-completions client, and a minimal server with soulchat's inference layer behind it.

Client (``ChatClient``): POST ``<endpoint>/chat/completions`` (the endpoint is the API base, e.g.
``http://127.0.0.1:8000/v1``; a URL already ending in ``/chat/completions`` is used as is) with the
standard library only. The API key, when the named environment variable holds one, is sent as
``Authorization: Bearer``. Every request has a timeout; a timeout, a refused or dropped connection, a
429/408/409/5xx answer, and an answer that is not the expected JSON (truncated, malformed, no
``choices[0].message.content``) are retried with exponential backoff (``Retry-After`` honoured up to 60
s), then returned as a failed ``Completion`` with a short reason (``request_timeout``,
``connection_error``, ``server_error``, ``rate_limited``, ``bad_response``) for the caller to count. An
answer that no retry can fix -- 400, 401, 403, 404 and other 4xx -- raises ``EndpointError`` with one
line naming the status, the server's message and the fix.

Server (``serve``, ``python -m soulchat.endpoint --model DIR``): ``/v1/chat/completions`` and
``/v1/models`` answered by a local model loaded with ``soulchat.inference.load_model``: the messages
(system, user, assistant) are rendered with the model's template and fitted into its context exactly as
chat does, and one request is generated at a time. It exists so construct's HTTP path can be tested
against a real server on loopback, and to serve a local model to OpenAI-compatible tools; it binds to
127.0.0.1 by default and has no authentication.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0


class EndpointError(RuntimeError):
    """An answer no retry can fix (bad request, wrong key, wrong URL or model): stop the run."""


@dataclass
class Completion:
    text: str | None  # None when the request failed
    finished: bool = True  # False when the server stopped at max_tokens (finish_reason "length")
    reason: str | None = None  # why it failed
    detail: str = ""
    attempts: int = 1


def chat_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class ChatClient:
    """Chat completions from an OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self, endpoint: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 120.0,
        retries: int = 3, backoff: float = 1.0, extra: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint {endpoint!r}: must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        self.url = chat_url(endpoint)
        self.model = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.api_key_env = api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.extra = dict(extra or {})

    def _request(self, body: dict[str, Any]) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        return urllib.request.Request(self.url, data=data, headers=headers, method="POST")

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float, top_p: float,
                 seed: int) -> Completion:  # fmt: skip
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "n": 1, "stream": False, **self.extra}  # fmt: skip
        reason, detail = "connection_error", ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, detail))
            try:
                with urllib.request.urlopen(self._request(body), timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code not in RETRY_STATUS:
                    raise EndpointError(self._fatal(err.code, message)) from None
                reason = "rate_limited" if err.code == 429 else "server_error"
                retry_after = err.headers.get("Retry-After") if err.headers else None
                detail = f"HTTP {err.code}: {message}" + (f" (retry-after {retry_after})" if retry_after else "")
                continue
            except TimeoutError:
                reason, detail = "request_timeout", f"no answer within --timeout {self.timeout:g} s"
                continue
            except urllib.error.URLError as err:
                if isinstance(err.reason, TimeoutError):
                    reason, detail = "request_timeout", f"no answer within --timeout {self.timeout:g} s"
                else:
                    reason, detail = "connection_error", f"{err.reason}"
                continue
            except (ConnectionError, OSError, http.client.HTTPException) as err:  # reset or cut mid-answer
                reason, detail = "connection_error", f"{type(err).__name__}: {err}"
                continue
            parsed = _parse_answer(raw)
            if isinstance(parsed, str):
                reason, detail = "bad_response", parsed
                continue
            text, finish = parsed
            return Completion(text, finish != "length", attempts=attempt + 1)
        return Completion(None, reason=reason, detail=detail, attempts=self.retries + 1)

    def _delay(self, attempt: int, detail: str) -> float:
        delay = self.backoff * 2 ** (attempt - 1)
        if "retry-after " in detail:
            try:
                delay = max(delay, min(float(detail.rsplit("retry-after ", 1)[1].rstrip(")")), MAX_RETRY_AFTER_S))
            except ValueError:
                pass  # an HTTP-date Retry-After: keep the backoff
        return delay

    def _fatal(self, code: int, message: str) -> str:
        where = f"--endpoint {self.url} answered HTTP {code}: {message}"
        if code in (401, 403):
            key = (f"the key in ${self.api_key_env} was refused" if self.api_key
                   else f"no API key was sent (${self.api_key_env} is unset)")  # fmt: skip
            return f"{where}; {key}: set a valid key in the environment variable named by --api-key-env"
        if code == 404:
            return f"{where}; check the URL (the API base, e.g. http://host:8000/v1) and --model {self.model!r}"
        return f"{where}; the request was refused as malformed: check --model and the generation options"


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read()[:2000]
    except OSError:
        return err.reason or ""
    try:
        data = json.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message", error) if isinstance(error, dict) else error
        text = str(message)
    except (ValueError, AttributeError):
        text = raw.decode("utf-8", "replace")
    return " ".join(text.split())[:300] or (err.reason or "")


def _parse_answer(raw: bytes) -> tuple[str, str | None] | str:
    """(content, finish_reason) of a chat-completions answer, or a description of what is wrong."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"the answer is not valid JSON ({err}; {len(raw)} bytes)"
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return "the answer has no choices[0].message.content"
    if not isinstance(content, str):
        return f"choices[0].message.content is {type(content).__name__}, not text"
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return content, finish if isinstance(finish, str) else None


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------

_ROLES = {"system": "system", "user": "client", "assistant": "counselor"}


def serve(lm: Any, options: Any, host: str = "127.0.0.1", port: int = 0, name: str | None = None) -> ThreadingHTTPServer:
    """A started OpenAI-compatible server for ``lm`` (a soulchat.inference.LoadedModel) with decoding
    ``options`` (GenerationConfig; the request's max_tokens/temperature/top_p/seed override its values).
    Returns the server (``server.server_address`` has the port; ``server.shutdown()`` stops it)."""
    import dataclasses

    import torch

    from soulchat.data.conversation import Turn
    from soulchat.inference import fit_context, generate_batch

    lock = threading.Lock()
    model_name = name or lm.path

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                turns = [Turn(_ROLES[m["role"]], m["content"]) for m in body["messages"]]
                gen = dataclasses.replace(
                    options,
                    max_new_tokens=int(body.get("max_tokens", options.max_new_tokens)),
                    do_sample=float(body.get("temperature", options.temperature)) > 0,
                    temperature=float(body.get("temperature", options.temperature)) or options.temperature,
                    top_p=float(body.get("top_p", options.top_p)),
                )
                prompt, _ = fit_context(lm, turns, gen.max_new_tokens, "request")
            except (ValueError, KeyError, TypeError) as err:  # ContextTooLong is a ValueError
                self._send(400, {"error": {"message": str(err), "type": type(err).__name__}})
                return
            stopped: list[bool] = []
            with lock:
                torch.manual_seed(int(body.get("seed", options.seed)))
                (text,) = generate_batch(lm, [prompt], gen, stopped=stopped)
            self._send(200, {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if stopped[0] else "length"}],
            })  # fmt: skip

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="soulchat-endpoint").start()
    return server


def main(argv: list[str] | None = None) -> int:
    import argparse

    from soulchat.cli import run_cli

    def _main(args_list: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="python -m soulchat.endpoint", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        parser.add_argument("--model", required=True, help="local Hugging Face model directory")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--debug", action="store_true")
        args = parser.parse_args(args_list)
        from soulchat.inference import load_model
        from soulchat.options import GenerationConfig

        server = serve(load_model(args.model), GenerationConfig(), args.host, args.port)
        print(f"serving {args.model} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()
        return 0

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
