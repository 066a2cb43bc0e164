"""An HTTP rollout server on Hugging Face ``transformers``: the fallback for CPU machines and tests.

It speaks the subset of SGLang's HTTP API that verl's server-mode rollout uses (see
:mod:`verl.workers.rollout.async_server`), so the same client code drives it and SGLang's server::

    python -m verl.workers.rollout.hf.hf_server --model-path DIR [--host 127.0.0.1] [--port 30000] [--seed 0]

Requests that arrive while the model is busy wait and then run together as one batch (each row with its own
sampling parameters and stop condition), decoded step by step with a KV cache. Sampling parameters (SGLang's
names): ``max_new_tokens``, ``temperature`` (``0`` = greedy), ``top_p``, ``top_k`` (``-1`` = off), ``n``,
``stop_token_ids``, ``ignore_eos``. The returned log-probs are ``log_softmax(logits / temperature)`` of each
sampled token (temperature 1 for greedy), the convention of verl's HF rollout.

Weights: ``/update_weights_from_tensor`` takes safetensors blobs (``load_format: "safetensors"``, what verl's client
sends); SGLang's pickled payload is accepted only when the server was started with ``--allow-pickle`` (unpickling
runs code chosen by the sender). ``/update_weights_from_disk`` loads an HF model directory or one ``.safetensors``
file. Each update increments ``weight_version`` (returned by ``/generate`` and ``/server_info``). There is no KV cache
kept between requests, and CPU memory is not released: ``/flush_cache`` and ``/release|resume_memory_occupation``
answer success and do nothing. The server listens on ``127.0.0.1`` by default: it has no authentication.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import io
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("verl.hf_server")

__all__ = ["GenRow", "HFGenerator", "build_app", "main"]


@dataclass
class GenRow:
    """One sample to generate: the prompt and its resolved sampling parameters."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: frozenset
    return_logprob: bool


class HFGenerator:
    """The model and a batched sampling loop; used from a single worker thread (so updates and generation are
    ordered)."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, device: str = "cpu") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_path = model_path
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        config = AutoConfig.from_pretrained(model_path)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 4096)
        eos = set()
        for source in (config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                eos.update([int(value)] if isinstance(value, int) else [int(v) for v in value])
        self.eos_ids = frozenset(eos)
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.weight_version = 0
        self.param_names = set(self.model.state_dict().keys())

    # ------------------------------------------------------------------------------------------------ weights ---
    def load_named_tensors(self, tensors: dict[str, torch.Tensor]) -> int:
        unknown = sorted(set(tensors) - self.param_names)
        if unknown:
            raise ValueError(f"the server's model has no parameters named {unknown[:10]}; send HF parameter names "
                             f"(e.g. {sorted(self.param_names)[:3]})")
        state = self.model.state_dict()
        bad = [(k, tuple(v.shape), tuple(state[k].shape)) for k, v in tensors.items() if v.shape != state[k].shape]
        if bad:
            raise ValueError(f"shape mismatches (name, sent, model): {bad[:10]}")
        with torch.no_grad():
            for name, value in tensors.items():
                state[name].copy_(value.to(state[name].dtype))
        self.weight_version += 1
        return self.weight_version

    def load_from_disk(self, path: str) -> int:
        from safetensors.torch import load_file

        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"{path} has no *.safetensors files")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(f"model_path {path!r} is neither a directory nor a file")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(f))
        tensors = {k: v for k, v in tensors.items() if k in self.param_names or not k.startswith("lm_head")}
        return self.load_named_tensors(tensors)

    # --------------------------------------------------------------------------------------------- generation ---
    @torch.no_grad()
    def generate(self, rows: list[GenRow]) -> list[tuple[list[int], list[float] | None, str]]:
        """Generate all ``rows`` as one left-padded batch; returns ``(token_ids, log_probs, finish_reason)`` each."""
        if not rows:
            return []
        batch = len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention[i, width - len(r.prompt_ids):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        position = (attention.cumsum(-1) - 1).clamp(min=0)
        temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32)
        greedy = temps <= 0
        scale = torch.where(greedy, torch.ones_like(temps), temps)
        top_k = torch.tensor([r.top_k if r.top_k and r.top_k > 0 else 0 for r in rows])
        top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32)
        limits = torch.tensor([r.max_new_tokens for r in rows])
        outputs: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        reasons = ["length"] * batch
        finished = limits <= 0
        past = None
        current, cur_pos = input_ids, position
        for step in range(int(limits.max().item()) if batch else 0):
            if bool(finished.all()):
                break
            out = self.model(input_ids=current,
                             attention_mask=attention,
                             position_ids=cur_pos,
                             past_key_values=past,
                             use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu() / scale[:, None]
            log_probs = torch.log_softmax(logits, dim=-1)
            tokens = self._sample(logits, greedy, top_k, top_p)
            token_logp = log_probs.gather(1, tokens[:, None])[:, 0]
            for i, r in enumerate(rows):
                if finished[i]:
                    continue
                tok = int(tokens[i])
                outputs[i].append(tok)
                if r.return_logprob:
                    logps[i].append(float(token_logp[i]))
                if tok in r.stop_ids:
                    finished[i] = True
                    reasons[i] = "stop"
                elif len(outputs[i]) >= r.max_new_tokens:
                    finished[i] = True
            current = tokens[:, None].to(self.device)
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=self.device)], 1)
            cur_pos = cur_pos[:, -1:] + 1
        return [(outputs[i], logps[i] if rows[i].return_logprob else None, reasons[i]) for i in range(batch)]

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
        argmax = logits.argmax(dim=-1)
        if bool(greedy.all()):
            return argmax
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1])[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1]))
        drop = ranks >= k[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        cumulative = probs.cumsum(-1) - probs  # mass before each token: keep while it is below top_p
        drop = drop | (cumulative >= top_p[:, None])
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        choice = torch.multinomial(torch.softmax(sorted_logits, dim=-1), 1, generator=self.generator)[:, 0]
        sampled = order.gather(1, choice[:, None])[:, 0]
        return torch.where(greedy, argmax, sampled)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _rows_from_request(body: dict, gen: HFGenerator) -> tuple[list[GenRow], list[int], bool]:
    """Parse a ``/generate`` body into rows; returns ``(rows, samples per request, batched request)``."""
    if "input_ids" not in body:
        raise ValueError("/generate needs input_ids (token ids; this server does not tokenize text)")
    ids = body["input_ids"]
    batched = bool(ids) and isinstance(ids[0], list)
    prompts = ids if batched else [ids]
    params = body.get("sampling_params") or {}
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling_params")
    return_logprob = bool(body.get("return_logprob", False))
    rows, counts = [], []
    for prompt, p in zip(prompts, params):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("an empty prompt (input_ids=[]) cannot be continued")
        room = gen.context_length - len(prompt)
        if room <= 0:
            raise ValueError(f"the prompt has {len(prompt)} tokens, the model's context length is "
                             f"{gen.context_length}: nothing can be generated. Shorten or truncate the prompt")
        max_new = min(int(p.get("max_new_tokens", 128)), room)
        stop = set(int(t) for t in (p.get("stop_token_ids") or []))
        if not p.get("ignore_eos", False):
            stop |= gen.eos_ids
        n = int(p.get("n", 1) or 1)
        row = GenRow(prompt, max_new, float(p.get("temperature", 1.0)), float(p.get("top_p", 1.0)),
                     int(p.get("top_k", -1)), frozenset(stop), return_logprob)
        rows.extend([row] * n)
        counts.append(n)
    return rows, counts, batched or any(c > 1 for c in counts)


class _Batcher:
    """Collects pending generation requests and runs them together on the model thread."""

    def __init__(self, gen: HFGenerator, max_batch_size: int) -> None:
        self.gen = gen
        self.max_batch_size = max(1, int(max_batch_size))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-model")
        self.running = 0

    async def submit(self, rows: list[GenRow]) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, future))
        return await future

    async def run_on_model_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def loop(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0][0])
            while not self.queue.empty() and size < self.max_batch_size:
                job = self.queue.get_nowait()
                jobs.append(job)
                size += len(job[0])
            rows = [row for job_rows, _ in jobs for row in job_rows]
            self.running = len(rows)
            try:
                results = await self.run_on_model_thread(self.gen.generate, rows)
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.running = 0
            start = 0
            for job_rows, future in jobs:
                if not future.done():
                    future.set_result(results[start:start + len(job_rows)])
                start += len(job_rows)


def _decode_payload(blob: str, load_format: str | None, allow_pickle: bool) -> dict[str, torch.Tensor]:
    raw = base64.b64decode(blob)
    if load_format == "safetensors":
        from safetensors.torch import load

        return load(raw)
    if not allow_pickle:
        raise ValueError("this payload is pickled (SGLang's format); the HF server only unpickles weights when "
                         "started with --allow-pickle. Fix: send load_format='safetensors' "
                         "(verl.workers.rollout.async_server.push_weights does)")
    obj = pickle.load(io.BytesIO(raw))
    return {str(name): tensor for name, tensor in obj}


def build_app(gen: HFGenerator, max_batch_size: int = 256, allow_pickle: bool = False) -> Any:
    """The aiohttp application (exposed for in-process tests)."""
    from aiohttp import web

    batcher = _Batcher(gen, max_batch_size)
    routes = web.RouteTableDef()

    def ok(**extra: Any) -> Any:
        return web.json_response({"success": True, "message": "", **extra})

    def bad(message: str, status: int = 400) -> Any:
        return web.json_response({"success": False, "message": message, "error": message}, status=status)

    @routes.get("/health")
    @routes.get("/health_generate")
    async def health(_: Any) -> Any:
        return web.Response(text="ok")

    @routes.get("/server_info")
    @routes.get("/get_server_info")
    async def server_info(_: Any) -> Any:
        return web.json_response({
            "model_path": gen.model_path,
            "context_length": gen.context_length,
            "weight_version": gen.weight_version,
            "tp_size": 1,
            "backend": "hf",
            "running_rows": batcher.running,
            "queued_requests": batcher.queue.qsize(),
            "pid": os.getpid(),
        })

    @routes.get("/get_model_info")
    async def model_info(_: Any) -> Any:
        return web.json_response({"model_path": gen.model_path, "is_generation": True})

    @routes.post("/generate")
    async def generate(request: Any) -> Any:
        try:
            body = await request.json()
            rows, counts, as_list = _rows_from_request(body, gen)
        except (ValueError, TypeError, KeyError) as exc:
            return bad(f"/generate: {exc}")
        try:
            results = await batcher.submit(rows)
        except Exception as exc:  # noqa: BLE001
            logger.exception("generation failed")
            return bad(f"/generate failed: {type(exc).__name__}: {exc}", status=500)
        answers = []
        for (tokens, logps, reason), row in zip(results, rows):
            meta = {
                "prompt_tokens": len(row.prompt_ids),
                "completion_tokens": len(tokens),
                "finish_reason": {
                    "type": reason
                },
                "weight_version": gen.weight_version,
            }
            if logps is not None:
                meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(logps, tokens)]
            answers.append({"text": "", "output_ids": tokens, "meta_info": meta})
        return web.json_response(answers if as_list else answers[0])

    @routes.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Any) -> Any:
        try:
            body = await request.json()
            blobs = body.get("serialized_named_tensors") or []
            if not blobs:
                raise ValueError("serialized_named_tensors is empty")
            # SGLang sends one copy per tensor-parallel rank; one rank here
            tensors = _decode_payload(blobs[0], body.get("load_format"), allow_pickle)
            version = await batcher.run_on_model_thread(gen.load_named_tensors, tensors)
        except (ValueError, TypeError, KeyError, pickle.UnpicklingError) as exc:
            return bad(f"update_weights_from_tensor: {exc}")
        return ok(weight_version=version, num_tensors=len(tensors))

    @routes.post("/update_weights_from_disk")
    async def update_from_disk(request: Any) -> Any:
        try:
            body = await request.json()
            version = await batcher.run_on_model_thread(gen.load_from_disk, str(body["model_path"]))
        except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
            return bad(f"update_weights_from_disk: {exc}")
        return ok(weight_version=version)

    async def noop(_: Any) -> Any:
        return ok()

    for path in ("/flush_cache", "/release_memory_occupation", "/resume_memory_occupation", "/begin_weight_update",
                 "/end_weight_update"):
        routes.post(path)(noop)

    app = web.Application(client_max_size=1 << 31)
    app.add_routes(routes)

    async def start_batcher(app: Any) -> None:
        app["batcher_task"] = asyncio.create_task(batcher.loop())

    async def stop_batcher(app: Any) -> None:
        app["batcher_task"].cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(start_batcher)
    app.on_cleanup.append(stop_batcher)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HF fallback rollout server (SGLang-compatible HTTP API)")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=256, help="rows decoded together at most")
    parser.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--allow-pickle", action="store_true", help="accept SGLang's pickled weight payloads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from aiohttp import web

    gen = HFGenerator(args.model_path, dtype=args.dtype, seed=args.seed, device=args.device)
    logger.info("loaded %s (context %d) on %s; serving on %s:%d", args.model_path, gen.context_length, args.device,
                args.host, args.port)
    web.run_app(build_app(gen, args.max_batch_size, args.allow_pickle),
                host=args.host,
                port=args.port,
                print=None,
                access_log=None)


if __name__ == "__main__":
    main()
