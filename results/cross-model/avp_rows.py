"""avp's communication (PyPI `avp`, the Agent Vector Protocol SDK) as rows beside a recorded xmodel
evaluation, on the same items: issue 19, item 6.

For each item A "thinks" on prompt_a (avp's `think`: A's prompt, then `--steps` latent steps, each
feeding A's last hidden state back as an input embedding) and B answers prompt_b with A's context
(avp's `generate(..., context=...)`). Which transfer avp uses is what its handshake negotiates for the
pair (avp.CompatibilityResolver):
  avp_latent    A = B (hash match): B reads A's whole KV cache (prompt_a and the latent steps) before
                its own prompt; bytes = the AVP wire message of that cache (`context.to_bytes()`)
  avp_rosetta   A != B, shared tokenizer or >= 100 shared BPE tokens: A's last hidden state goes
                through A's LM head to a distribution over the (shared) vocabulary, which weights B's
                input embeddings into one vector, normalized to B's embedding norm ("Rosetta Stone",
                no training); B reads that one position before its prompt; bytes = that vector in B's
                dtype (what avp's vLLM connector ships)
  (json)        no projection path: avp sends text, which is xmodel's nl row; no latent row is made
Each row runs beside its mismatched control (item i gets item σ(i)'s context, σ xmodel's fixed
derangement), and B alone through avp's own generate (no context) is compared with the record's
b_alone replies: that the two harnesses read the same prompts and decode alike.

Items, prompts, cut and scores are xmodel's (pipeline/tasks, pipeline/evaluation/external.py); the
record gives b_alone, nl and the skyline of those very items, and every avp row gets its Wilson
interval and exact McNemar tests against them (pipeline/evaluation/results.summarize). avp is an
optional dependency (`pip install 'xmodel[avp]'`), imported here only.

  XMODEL_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python results/cross-model/avp_rows.py \\
      --record results/cross-model/countries --out results/cross-model/avp/smol-q05 \\
      -S models.a=smollm2-135m-instruct -S models.b=qwen2.5-coder-0.5b-instruct \\
      -S evaluate.countries.places=eval -S evaluate.countries.n=100 countries
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

AVP_VERSION = "0.6.2"  # the release these rows were measured with (pyproject's `avp` extra pins it)
# avp's own default: HuggingFaceConnector.think(steps=20), and "All benchmarks used steps=20" (its README);
# fixed before any score, never tuned on them
DEFAULT_STEPS = 20


def _avp():
    from pipeline.errors import UserError

    try:
        import avp
    except ImportError:
        raise UserError(f"avp is not installed: pip install 'xmodel[avp]' (avp=={AVP_VERSION}), then rerun") from None
    if avp.__version__ != AVP_VERSION:
        print(f"note: avp {avp.__version__}, these rows were first measured with {AVP_VERSION}", file=sys.stderr)
    return avp


def _stub(prompt_tokens: int, new: int, seconds: float):
    """A Generation of the lengths avp ran (its own loop, not xmodel's), for xmodel's FLOP estimate
    (pipeline/evaluation/compute.py): token ids are not needed there, only how many."""
    from pipeline.generation import Generation

    return Generation(tokens=[[0] * new], texts=[""], prompt_tokens=[prompt_tokens], seconds=seconds)


def _record(args: argparse.Namespace, prompts, decoding, names: tuple[str, str]):
    """The xmodel record of these items (recorded_runs), or None while it is not written yet."""
    from pipeline.evaluation.external import record_paths, recorded_runs
    from pipeline.errors import UserError

    if args.record is None:
        return None
    try:
        record_paths(args.record, args.task)
    except UserError:
        return None  # not evaluated yet: the rows alone now, paired later (--pair)
    return recorded_runs(args.record, args.task, prompts, decoding, names)


def run(args: argparse.Namespace) -> dict[str, Path]:
    from pipeline.cli import parse_sets
    from pipeline.config import load_params
    from pipeline.errors import UserError
    from pipeline.evaluation.external import external_result, recorded_runs, write_result
    from pipeline.evaluation.prompts import task_prompts
    from pipeline.generation import cut_at_stops
    from stages.evaluate import evaluate_config

    params = load_params(overrides=parse_sets(tuple(args.sets)))
    cfg = evaluate_config(params)
    prompts, decoding = task_prompts(args.task, cfg)
    names = (params.model_spec("a"), params.model_spec("b"))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    recorded = _record(args, prompts, decoding, names)  # checked before avp runs, when it is there
    if recorded is None and not args.pair:
        log(f"no evaluation of {args.task} at --record {args.record} (yet): avp's rows alone, to pair later")
    if args.pair:  # avp's rows as an earlier run wrote them, paired with the record now there
        if recorded is None:
            raise UserError(f"--pair: no evaluation of {args.task} at --record {args.record}: evaluate it first")
        mine = recorded_runs(args.out, args.task, prompts, decoding, names, methods=None, required=())
        runs = [r for name, r in mine.runs.items() if name.startswith("avp_")]
        info = {key: mine.details[key] for key in ("avp", "run") if key in mine.details}
    else:
        runs, info = avp_runs(args, params, cfg, prompts, decoding, log)
    alone = info["avp"]["b_alone_replies"]
    if recorded is not None:  # B alone through avp's generate against the record's: same prompts, same decoding
        same = sum(cut_at_stops(a, decoding.stop_strings).strip() == b.strip()
                   for a, b in zip(alone, recorded.runs["b_alone"].texts))
        info["avp"]["b_alone_reproduced"] = {"same_replies": same, "n": len(alone)}
        log(f"B alone through avp = the record's b_alone on {same}/{len(alone)} items")
    else:
        log("avp's rows alone: pair them with the record once it is written (--pair, the same -S and --out)")
    result = external_result(args.task, prompts, decoding, recorded, runs, info, names, n_boot=cfg.n_boot)
    out = write_result(args.out, result)
    if not args.quiet:
        print(result.table())
    return out


def avp_runs(args: argparse.Namespace, params, cfg, prompts, decoding, log) -> tuple[list, dict]:
    """avp's row and its mismatched control on these items, and the run's facts (avp's version and
    steps, B alone's replies through avp's generate, command, machine, date)."""
    from pipeline.encoding import encode
    from pipeline.errors import UserError
    from pipeline.evaluation.compute import Compute
    from pipeline.evaluation.external import external_run
    from pipeline.evaluation.methods.latent import derangement
    from pipeline.evaluation.pair import load_pair

    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: avp thinks at least one latent step; its default is {DEFAULT_STEPS}")
    if decoding.sampling != "greedy" or not cfg.chat:
        raise UserError(f"evaluate.{args.task}: avp rows need greedy decoding with chat templates (sampling "
                        f"{decoding.sampling!r}, chat {cfg.chat}): avp's generate samples with its own draws")
    pair = load_pair(params.model_specs(), params.paths.cache_dir(), cfg.device, cfg.dtype)
    avp = _avp()
    import torch
    from avp.connectors.base import _render_prompt, _tokenize_prompt  # how avp turns a prompt into ids

    conn_a = avp.HuggingFaceConnector(model=pair.model_a, tokenizer=pair.tok_a)
    conn_b = conn_a if pair.same_model else avp.HuggingFaceConnector(model=pair.model_b, tokenizer=pair.tok_b)
    session = avp.CompatibilityResolver.resolve(conn_a.get_model_identity(), conn_b.get_model_identity(),
                                                pair.tok_a, pair.tok_b)
    path = session.resolution_path
    latent = path in ("hash_match", "structural_match")
    if not latent and path not in ("shared_tokenizer", "vocab_overlap", "avp_map_file"):
        raise UserError(f"avp negotiates {path} for {pair.name_a} → {pair.name_b}: it would send text (xmodel's nl "
                        "row), no latent transfer to measure")
    if latent and not pair.same_model:
        raise UserError(f"avp negotiates {path} for two different models ({pair.name_a}, {pair.name_b}): B would read "
                        "A's cache as its own; these rows measure same-model KV only for A = B")
    name = "avp_latent" if latent else "avp_rosetta"

    # the prompts avp renders must be the ones xmodel evaluated, token for token
    for role, conn, tok, texts in (("A", conn_a, pair.tok_a, prompts.a), ("B", conn_b, pair.tok_b, prompts.b)):
        for i, text in enumerate(texts):
            theirs = _tokenize_prompt(tok, _render_prompt(tok, [{"role": "user", "content": text}]), "cpu")[0][0].tolist()
            if theirs != encode(tok, text, cfg.chat, prompts.cue):
                why = "" if getattr(tok, "chat_template", None) else " (no chat template: avp wraps it in its own markers)"
                raise UserError(f"item {prompts.ids[i]}: avp renders {role}'s prompt into other tokens than xmodel{why}; "
                                "its rows would not be of the same prompts")

    def gen_b(i: int, context, source=None) -> tuple[str, float]:
        t = time.perf_counter()
        extra = {"source": source, "cross_model": True} if source is not None else {}
        reply = conn_b.generate(prompts.b[i], context=context, max_new_tokens=decoding.max_new_tokens,
                                do_sample=False, **extra)
        return reply, time.perf_counter() - t

    def think(i: int):
        t = time.perf_counter()
        ctx = conn_a.think(prompts.a[i], steps=args.steps)
        return ctx, time.perf_counter() - t

    n, sigma = len(prompts.ids), derangement(len(prompts.ids))
    b_len = [len(encode(pair.tok_b, t, cfg.chat, prompts.cue)) for t in prompts.b]
    a_len = [len(encode(pair.tok_a, t, cfg.chat, prompts.cue)) for t in prompts.a]
    b_bytes = pair.width_b * (torch.finfo(pair.model_b.dtype).bits // 8)  # rosetta: one vector of B's width

    # one pass per row: item i with its own context, then with item σ(i)'s (the mismatched control)
    replies = {"own": [], "mismatched": []}
    sizes = {"own": [], "mismatched": []}
    compute = {"own": Compute(), "mismatched": Compute()}
    contexts, thought, steps_run, cache_len = [], [], [], []
    start = time.perf_counter()
    for row in ("own", "mismatched"):
        for i in range(n):
            src = i if row == "own" else sigma[i]
            if latent or row == "own":  # A = B: generate extends the cache in place, so σ(i)'s is thought anew
                ctx, secs = think(src)
                size = len(ctx.to_bytes()) if latent else b_bytes  # before generate reads the cache
                if not latent:
                    ctx.past_key_values = None  # the projection reads only A's last hidden state: keep memory small
                    contexts.append(ctx)
                    thought.append(secs)
                if row == "own":
                    steps_run.append(ctx.num_steps)
                    cache_len.append(ctx.seq_len)
            else:  # rosetta: A's context of σ(i), as thought in the first pass (and charged again)
                ctx, secs, size = contexts[src], thought[src], b_bytes
            compute[row].add_run(pair.model_a, "a", _stub(a_len[src], ctx.num_steps, secs))
            reply, secs = gen_b(i, ctx, source=None if latent else conn_a)
            # B's new tokens: the reply re-tokenized (avp returns text only); before its prompt B ran
            # rosetta's one projected position (A's cache, for A = B, is not rerun by B)
            new = len(pair.tok_b(reply, add_special_tokens=False)["input_ids"])
            compute[row].add_run(pair.model_b, "b", _stub(b_len[i] + (0 if latent else 1), new, secs))
            replies[row].append(reply)
            sizes[row].append(size)
            if (i + 1) % 10 == 0:
                log(f"{name} ({row}): {i + 1}/{n} items, {time.perf_counter() - start:.0f}s")
    # B alone through avp's generate (no context): compared with the record's b_alone (run())
    alone = [gen_b(i, None)[0] for i in range(n)]

    avp_map = None if latent else conn_b._avp_map_cache.get(conn_a._model_hash)
    details = {"transfer": "kv_cache" if latent else "rosetta", "handshake": path, "steps": args.steps,
               "steps_run": {"min": min(steps_run), "max": max(steps_run)},
               "a_cache_positions": {"min": min(cache_len), "max": max(cache_len)}}
    if avp_map is not None:
        details["projection"] = {"method": avp_map.method.value, "shared_tokens": avp_map.overlap_count or None,
                                 "shared_share": avp_map.overlap_ratio or None,
                                 "a_hidden_bytes": pair.width_a * (torch.finfo(pair.model_a.dtype).bits // 8)}
    own = external_run(prompts, decoding, name, replies["own"], sizes["own"], compute["own"], "avp", details)
    control = external_run(prompts, decoding, f"{name}~mismatched", replies["mismatched"], sizes["mismatched"],
                           compute["mismatched"], "control", details, control_of=name, control="mismatched")
    info = {"avp": {"version": avp.__version__, "steps": args.steps,
                    "steps_from": "avp's default (HuggingFaceConnector.think steps=20; its README: every benchmark "
                                  "used steps=20), fixed before any score",
                    "b_alone_replies": alone},
            "run": {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                               f"({'cuda' if torch.cuda.is_available() else 'cpu'}), {pair.model_b.dtype}",
                    "wall_seconds": round(time.perf_counter() - start, 1)}}
    return [own, control], info


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a registered task (pipeline/tasks/registry.py), as the record evaluated it")
    parser.add_argument("--record", type=Path,
                        help="the data dir or results folder of the xmodel evaluation of these items (where it is "
                             "not written yet, avp's rows alone: pair them later with --pair)")
    parser.add_argument("--pair", action="store_true",
                        help="run nothing: pair the avp rows already in --out with --record")
    parser.add_argument("--out", required=True, type=Path, help="folder for evaluate-TASK.json, TASK.predictions.jsonl, "
                                                                "TASK.table.md")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"avp's latent steps (default {DEFAULT_STEPS}, avp's)")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="an xmodel param, as `xmodel -S` takes it (the record's run's params)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    # avp caches projection maps under $AVP_CACHE_DIR (default ~/.avp): a throwaway one unless set
    scratch = None if "AVP_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="avp-maps-")
    if scratch:
        os.environ["AVP_CACHE_DIR"] = scratch
    try:
        out = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if not args.quiet:
        print("wrote " + ", ".join(str(p) for p in out.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
