"""The cost of constrained decoding: grammar compile times (cold and cached), per-step costs, and
tokens/s through the server with and without a JSON schema at 1 and 16 clients. Writes
bench/STRUCTURED.md (and the raw figures under bench/runs/).

    python -m bench.structured                       # tiny LLM + its tokenizer, and SmolLM2's if converted
    python -m bench.structured --model-dir DIR       # serve this LLM instead of the tiny one
    python -m bench.structured --compare-libraries   # also xgrammar / outlines-core, if importable

The library comparison needs them importable without touching the project's venv, e.g.
`pip install --no-deps --target /tmp/grammarlibs xgrammar apache-tvm-ffi outlines-core` and
`PYTHONPATH=/tmp/grammarlibs`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import requests

from .load import Request, run_load
from .report import machine_meta
from .servers import REPO, bench_serve_config, serve_run
from .workloads import PROMPT

SCHEMAS = {
    "flat (2 required)": {"type": "object", "additionalProperties": False, "required": ["answer", "confidence"],
                          "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}}},
    "person (nested, enum, bounds, pattern)": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "age", "role", "tags", "address"], "properties": {
            "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
            "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                        "properties": {"city": {"type": "string"},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
    "tree (recursive $ref)": {"$defs": {"node": {"type": "object", "additionalProperties": False,
                                                 "required": ["v", "kids"], "properties": {
                                                     "v": {"type": "integer"},
                                                     "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                              "maxItems": 2}}}}, "$ref": "#/$defs/node"},
    "wide (40 properties, 20 required)": {
        "type": "object", "additionalProperties": False,
        "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(40)},
        "required": [f"field_{i}" for i in range(0, 40, 2)]},
}
SERVED_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "points"], "properties": {
    "title": {"type": "string"}, "points": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}}


def tokenizers(model_dir: Path | None) -> dict[str, object]:
    from transformers import AutoTokenizer

    from loading.tiny.tokenizer import build_chatml_tokenizer

    found: dict[str, object] = {"tiny ChatML BPE (512)": build_chatml_tokenizer()}
    candidates = [model_dir] if model_dir else []
    candidates += sorted((Path.home() / ".cache/modelfleet").glob("*/SmolLM2-*"))
    for path in candidates:
        if path and (Path(path) / "tokenizer.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(path)
            found[f"{Path(path).name} ({len(tokenizer)})"] = tokenizer
            break
    return found


def compile_figures(tokenizer: object, budget: int = 512) -> dict:
    """Per schema: cold compile (new cache), cached copy, the admission's closing search, and per-step
    mask + advance costs over 64 steps of random logits."""
    import torch

    from deployments import structured

    end_ids = {tokenizer.eos_token_id}  # type: ignore[attr-defined]
    width = len(tokenizer)  # type: ignore[arg-type]
    started = time.perf_counter()
    structured.vocabulary(tokenizer, width, end_ids)
    out: dict = {"vocabulary_s": round(time.perf_counter() - started, 3), "schemas": {}}
    for name, schema in SCHEMAS.items():
        structured.CACHE = structured.GrammarCache()  # cold
        constraint = structured.json_schema_constraint(schema, "bench", name)
        started = time.perf_counter()
        row = structured.compile_row(constraint, tokenizer, width, end_ids, budget)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):
            structured.compile_row(constraint, tokenizer, width, end_ids, budget)
        cached = (time.perf_counter() - started) / 20
        generator = torch.Generator().manual_seed(0)
        masks, advances, taken = [], [], 0
        for _ in range(64):
            scores = torch.randn(width, generator=generator)
            t0 = time.perf_counter()
            masked = row.mask(scores)
            t1 = time.perf_counter()
            token = int(masked.argmax())
            if token in end_ids:
                break
            forced = row.advance(token, budget - taken - 1)
            masks.append(t1 - t0)
            advances.append(time.perf_counter() - t1)
            taken += 1
            if forced is not None or row.stopped:
                break
        out["schemas"][name] = {
            "cold_compile_ms": round(cold * 1e3, 2), "cached_ms": round(cached * 1e3, 3),
            "closing_tokens": len(structured.compile_row(constraint, tokenizer, width, end_ids, budget).closing),
            "mask_us_median": round(statistics.median(masks) * 1e6, 1) if masks else None,
            "advance_us_median": round(statistics.median(advances) * 1e6, 1) if advances else None,
            "advance_us_max": round(max(advances) * 1e6, 1) if advances else None, "steps": len(masks)}
    return out


def compare_libraries(tokenizer: object) -> dict:
    """Cold compile and per-step mask time for each importable library, same schemas (random logits)."""
    import torch

    width = len(tokenizer)  # type: ignore[arg-type]
    results: dict = {}
    try:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=width)
        compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        rows = {}
        for name, schema in SCHEMAS.items():
            started = time.perf_counter()
            matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
            cold = time.perf_counter() - started
            bitmask, times = xgr.allocate_token_bitmask(1, width), []
            generator = torch.Generator().manual_seed(0)
            for _ in range(64):
                if matcher.is_terminated():
                    break
                t0 = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                times.append(time.perf_counter() - t0)
                logits = torch.randn(1, width, generator=generator)
                xgr.apply_token_bitmask_inplace(logits, bitmask)
                if not matcher.accept_token(int(logits.argmax())):
                    break
            rows[name] = {"cold_compile_ms": round(cold * 1e3, 2),
                          "mask_us_median": round(statistics.median(times) * 1e6, 1)}
        results["xgrammar"] = rows
    except ImportError as exc:
        results["xgrammar"] = f"not importable: {exc}"
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core import json_schema as oj

        eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
        vocab: dict[str, list[int]] = {}
        for token in range(width):
            if token != eos:
                piece = tokenizer.convert_ids_to_tokens(token)  # type: ignore[attr-defined]
                text = tokenizer.convert_tokens_to_string([piece])  # type: ignore[attr-defined]
                vocab.setdefault(text, []).append(token)
        voc = Vocabulary(eos, vocab)
        rows = {}
        for name, schema in SCHEMAS.items():
            started = time.perf_counter()
            try:
                guide = Guide(Index(oj.build_regex_from_schema(json.dumps(schema)), voc))
            except Exception as exc:  # unsupported by its regex translation
                rows[name] = {"error": str(exc)[:120]}
                continue
            cold = time.perf_counter() - started
            times = []
            for _ in range(64):
                t0 = time.perf_counter()
                allowed = guide.get_tokens()
                times.append(time.perf_counter() - t0)
                if guide.is_finished() or not allowed:
                    break
                guide.advance(allowed[0])
            rows[name] = {"cold_compile_ms": round(cold * 1e3, 2),
                          "mask_us_median": round(statistics.median(times) * 1e6, 1)}
        results["outlines-core"] = rows
    except ImportError as exc:
        results["outlines-core"] = f"not importable: {exc}"
    return results


def served_figures(model_dir: Path | None, run_dir: Path, port: int, max_tokens: int, requests_per_client: int) -> dict:
    """Tokens/s through `serve run` with and without a schema, 1 and 16 clients (greedy, fixed prompt)."""
    models_dir = Path(tempfile.mkdtemp(prefix="mf-structured-models-"))
    config = bench_serve_config(port, models_dir, model_dir, only_llm=True)
    rows = []

    def make(schema: dict | None):
        body = {"model": "tiny-llm", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                "temperature": 0}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "summary", "schema": schema}}
        return lambda i: Request("/v1/chat/completions", json=body)

    with serve_run(config, run_dir, "structured") as server:
        run_load(server.url, make(None), 2, 6, max_wall_s=60)  # warm-up, and the grammar's first compile:
        run_load(server.url, make(SERVED_SCHEMA), 2, 6, max_wall_s=60)  # both stay out of the figures
        def batching() -> dict:
            return requests.get(server.url + "/health", timeout=10).json()["models"]["tiny-llm"]["replica"]["batching"]

        for clients in (1, 16):
            for label, schema in (("free", None), ("json_schema", SERVED_SCHEMA)):
                before = batching()
                stats = run_load(server.url, make(schema), clients, max(8, requests_per_client * clients),
                                 max_wall_s=120).as_dict()
                after = batching()
                steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
                rows.append({"clients": clients, "kind": label, **stats, "decode_steps": steps,
                             "model_calls": after["model_calls"] - before["model_calls"],
                             "largest_batch": after["largest_batch"]})
    return {"max_tokens": max_tokens, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Constrained decoding: what it costs", "",
             f"Measured {result['when']} on {result['machine'].get('cpu', 'this machine')} "
             f"({result['machine'].get('cpus', '?')} cores, load average at start "
             f"{tuple(round(x, 1) for x in result['machine'].get('load_average_at_start') or ())}; "
             "other work shared them), by `python -m bench.structured`.",
             "", "## Grammar compile and per-step costs (in-process)", "",
             "Cold: a new cache (the tokenizer's vocabulary already built, its one-time cost shown apart). "
             "Cached: a copy of the compiled matcher, what every later request with the same schema pays. "
             "Closing: tokens of the completion the admission's search found from the empty output "
             "(what max_tokens must at least allow). Mask: the allowed-token set for one step; advance: taking "
             "the token and keeping the closing (the budget guard), per constrained row and step.", ""]
    for tokenizer, figures in result["compile"].items():
        lines += [f"### {tokenizer}: vocabulary built in {figures['vocabulary_s']} s", "",
                  "| schema | cold compile ms | cached ms | closing tokens | mask µs (median) "
                  "| advance µs median / max |",
                  "|---|---|---|---|---|---|"]
        for name, row in figures["schemas"].items():
            lines.append(f"| {name} | {row['cold_compile_ms']} | {row['cached_ms']} | {row['closing_tokens']} | "
                         f"{row['mask_us_median']} | {row['advance_us_median']} / {row['advance_us_max']} |")
        lines.append("")
    if result.get("libraries"):
        lines += ["## Other libraries, same schemas (cold compile ms / mask µs median)", ""]
        for tokenizer, libs in result["libraries"].items():
            lines.append(f"{tokenizer}:")
            lines.append("")
            for lib, rows in libs.items():
                if isinstance(rows, str):
                    lines.append(f"- {lib}: {rows}")
                    continue
                cells = "; ".join(f"{name.split(' (')[0]} {r.get('cold_compile_ms', r.get('error'))} / "
                                  f"{r.get('mask_us_median', '-')}" for name, r in rows.items())
                lines.append(f"- {lib}: {cells}")
            lines.append("")
    served = result.get("served")
    if served:
        lines += ["## Through the server (serve run, one LLM replica, greedy, fixed prompt, "
                  f"max_tokens={served['max_tokens']})", "",
                  "| clients | request | requests/s | tokens/s | p50 ms | p99 ms | errors | model calls "
                  "| decode steps |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in served["rows"]:
            lines.append(f"| {row['clients']} | {row['kind']} | {row['rps']} | {row['tokens_per_s']} "
                         f"| {row['p50_ms']} | "
                         f"{row['p99_ms']} | {row['errors']} | {row.get('model_calls')} | {row.get('decode_steps')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path,
                        help="serve this LLM (and measure its tokenizer) instead of the tiny one")
    parser.add_argument("--compare-libraries", action="store_true")
    parser.add_argument("--no-server", action="store_true", help="compile figures only")
    parser.add_argument("--server-only", action="store_true", help="served figures only")
    parser.add_argument("--port", type=int, default=8611)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests-per-client", type=int, default=4)
    args = parser.parse_args()
    run_dir = REPO / "bench" / "runs" / time.strftime("structured-%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_meta(),
                    "compile": {}, "libraries": {}}
    for name, tokenizer in ({} if args.server_only else tokenizers(args.model_dir)).items():
        result["compile"][name] = compile_figures(tokenizer)
        if args.compare_libraries:
            result["libraries"][name] = compare_libraries(tokenizer)
        print(name, json.dumps(result["compile"][name], indent=1), flush=True)
    if not args.no_server:
        result["served"] = served_figures(args.model_dir, run_dir, args.port, args.max_tokens, args.requests_per_client)
    (run_dir / "structured.json").write_text(json.dumps(result, indent=1))
    (REPO / "bench" / "STRUCTURED.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
