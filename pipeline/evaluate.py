"""Evaluation of activation communication: methods compared on the same items, a text-similarity
probe, and a (k, j) layer sweep.

Methods (one name each in the results):
  b_alone          B answers from its own prompt
  a_alone          A answers from its own prompt
  nl               natural language: A's answer (its a_alone output) is shown to B, B answers
  ac_<f>           activation communication, no aligner, f in {replace, sum, mean}
  ac_<aligner>_<f> activation communication through a fitted aligner (f from `aligner_modes`)
  skyline          B sees what A saw (SQuAD private setting only; elsewhere it equals b_alone)

Tasks: SQuAD-format QA (private: A sees context and question, B only the question; shared: both
see both), scored by exact match and F1 (official normalization); GSM8K (both see the question),
scored by the final number. Every score comes with a 95% interval (Wilson for proportions,
bootstrap for F1), and every method is compared with b_alone and nl on the same items (exact
McNemar for binary scores, paired bootstrap for all). Compute per method: tokens each model ran
(A's tokens through k of its blocks for AC), an estimate of FLOPs, and wall time.

Everything here takes loaded models (tests use tiny ones); `load_pair` and stages/evaluate.py
build them from params.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import UserError
from pipeline.generation import SAMPLING, Decoding, Generation, generate
from pipeline.injection import MODES, communicate, map_vectors, prefill, sender_states

METHODS = ("b_alone", "a_alone", "nl", "ac", "skyline")  # "ac" = every f and every aligner


# --- configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SquadConfig:
    source: str = "generate"  # generate (offline, ours) | hub (rajpurkar/squad) | path to a SQuAD v1.1 .json
    n: int = 100
    seed: int = 0
    setting: str = "private"  # private: only A sees the context | shared: both see it
    max_new_tokens: int = 16  # answers are short; generation also stops at the first newline
    sampling: str = "greedy"  # the paper decodes its coordination games greedily
    top_p: float = 0.9
    temperature: float = 1.0


@dataclass(frozen=True)
class Gsm8kConfig:
    source: str = "reasoning-gym"  # reasoning-gym (offline gsm_symbolic) | hub (openai/gsm8k) | path to .jsonl
    n: int = 100
    seed: int = 0
    prompt: str = "debate"  # debate (Du et al.'s prompts, \\boxed{} answers) | brief (short solutions, for CPUs)
    max_new_tokens: int = 384
    sampling: str = "nucleus"  # the paper samples its reasoning benchmarks with p = 0.9
    top_p: float = 0.9
    temperature: float = 0.6  # Llama-3 instruct's generation_config default, which p = 0.9 also comes from


@dataclass(frozen=True)
class SimilarityConfig:
    source: str = "pydoc"  # held-out sentences: pydoc | c4 | .txt/.jsonl path (the training corpus is excluded)
    n: int = 200
    seed: int = 1
    min_chars: int = 40
    max_chars: int = 300


@dataclass(frozen=True)
class SweepConfig:
    task: str = "squad"  # squad (private setting) | gsm8k
    n: int = 24
    layers_a: list[int | float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    layers_b: list[int | float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    mode: str = "replace"
    max_new_tokens: int = 0  # 0 = the task's own


@dataclass(frozen=True)
class EvaluateConfig:
    layer_a: int | float = 0.75  # k: A's layer (int index, or relative depth in [0, 1]); 0 = embeddings
    layer_b: int | float = 0.75  # j: B's layer, same convention; the graft edits the output of block j
    modes: list[str] = field(default_factory=lambda: list(MODES))  # f for plain AC
    aligners: list[str] = field(default_factory=list)  # fitted aligners: names under <data>/aligners/ or dirs
    aligner_modes: list[str] = field(default_factory=lambda: ["replace"])  # f for AC through an aligner
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    chat: bool = True  # wrap prompts in the model's chat template when it has one
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    n_boot: int = 10_000
    squad: SquadConfig = field(default_factory=SquadConfig)
    gsm8k: Gsm8kConfig = field(default_factory=Gsm8kConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        validate(self)


def validate(cfg: EvaluateConfig) -> None:
    for key, values, allowed in (("modes", cfg.modes, MODES), ("aligner_modes", cfg.aligner_modes, MODES),
                                 ("methods", cfg.methods, METHODS)):
        for v in values:
            if v not in allowed:
                raise UserError(f"evaluate.{key}: {v!r} is not one of {', '.join(allowed)}")
    if cfg.sweep.mode not in MODES:
        raise UserError(f"evaluate.sweep.mode = {cfg.sweep.mode!r} is not one of {', '.join(MODES)}")
    if cfg.sweep.task not in ("squad", "gsm8k"):
        raise UserError(f"evaluate.sweep.task = {cfg.sweep.task!r} is not squad or gsm8k")
    if cfg.gsm8k.prompt not in GSM8K_STYLES:
        raise UserError(f"evaluate.gsm8k.prompt = {cfg.gsm8k.prompt!r} is not one of {', '.join(GSM8K_STYLES)}")
    if cfg.squad.setting not in ("private", "shared"):
        raise UserError(f"evaluate.squad.setting = {cfg.squad.setting!r} is not private or shared")
    for name, task in (("squad", cfg.squad), ("gsm8k", cfg.gsm8k)):
        if task.sampling not in SAMPLING:
            raise UserError(f"evaluate.{name}.sampling = {task.sampling!r} is not one of {', '.join(SAMPLING)}")
    positive = {"batch_size": cfg.batch_size, "squad.n": cfg.squad.n, "gsm8k.n": cfg.gsm8k.n,
                "similarity.n": cfg.similarity.n, "sweep.n": cfg.sweep.n, "n_boot": cfg.n_boot,
                "squad.max_new_tokens": cfg.squad.max_new_tokens, "gsm8k.max_new_tokens": cfg.gsm8k.max_new_tokens}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"evaluate.{key} = {value} must be at least 1")


def config_from_dict(raw: dict[str, Any]) -> EvaluateConfig:
    """The typed config from a params.yaml `evaluate` mapping (unknown keys refused)."""
    import dacite

    try:
        return dacite.from_dict(EvaluateConfig, raw or {}, config=dacite.Config(strict=True))
    except dacite.UnexpectedDataError as e:
        raise UserError(f"evaluate: unknown key(s) {sorted(e.keys)}: remove them or fix the spelling") from None
    except dacite.WrongTypeError as e:
        raise UserError(f"evaluate: {e.field_path} = {e.value!r} has the wrong type") from None


# --- models ----------------------------------------------------------------------------------------

@dataclass
class Pair:
    model_a: Any
    tok_a: Any
    model_b: Any
    tok_b: Any
    name_a: str = "A"
    name_b: str = "B"

    @property
    def width_a(self) -> int:
        return int(_text_config(self.model_a).hidden_size)

    @property
    def width_b(self) -> int:
        return int(_text_config(self.model_b).hidden_size)


def _text_config(model):
    return getattr(model.config, "text_config", None) or model.config


def load_pair(params: Any, cfg: EvaluateConfig) -> Pair:
    from pipeline.models import load_model, resolve_model

    models = {}
    for role in ("a", "b"):
        spec = params.model_spec(role)
        resolved = resolve_model(spec, params.paths.cache_dir())
        models[role] = (*load_model(resolved, device=cfg.device, dtype=cfg.dtype), spec)
    (ma, ta, sa), (mb, tb, sb) = models["a"], models["b"]
    return Pair(ma, ta, mb, tb, sa, sb)


def resolve_ks(pair: Pair, layer_a: int | float, layer_b: int | float) -> tuple[int, int]:
    from pipeline.layers import num_layers, resolve_layers

    return resolve_layers([layer_a], num_layers(pair.model_a))[0], resolve_layers([layer_b], num_layers(pair.model_b))[0]


def load_aligners(names: Sequence[str], data_dir: Path, pair: Pair, k: int, j: int) -> dict[str, Any]:
    """Fitted aligners by name: each a directory with aligner.json, given as a path or as a name
    under <data_dir>/aligners/. Widths must match A and B; layers recorded in the aligner's meta
    (keys layer_a/layer_b, or layers = {a, b}) must match k and j."""
    from pipeline.aligners import load_aligner

    out = {}
    for name in names:
        path = Path(name).expanduser()
        if not (path / "aligner.json").is_file():
            path = Path(data_dir) / "aligners" / name
        aligner = load_aligner(path)
        if (aligner.d_source, aligner.d_target) != (pair.width_a, pair.width_b):
            raise UserError(f"aligner {name} maps {aligner.d_source}→{aligner.d_target}, but the models are "
                            f"{pair.width_a}→{pair.width_b} wide: refit it on these models")
        meta = aligner.meta or {}
        layers = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
        la, lb = meta.get("layer_a", layers.get("a")), meta.get("layer_b", layers.get("b"))
        if (la is not None and int(la) != k) or (lb is not None and int(lb) != j):
            raise UserError(f"aligner {name} was fitted on layers ({la}, {lb}), but evaluation uses (k, j) = ({k}, {j}): "
                            "set evaluate.layer_a/layer_b to its layers or refit it")
        out[Path(name).name] = aligner
    return out


# --- prompts ---------------------------------------------------------------------------------------

def encode(tokenizer: Any, text: str, chat: bool = True, cue: str = "Answer:") -> list[int]:
    """Token ids of a user turn: the chat template (with the assistant cue) when the tokenizer has
    one and chat is on, else the plain text followed by a newline and `cue`."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(out, "keys"):  # BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer(f"{text}\n{cue}", add_special_tokens=True)["input_ids"]]


SQUAD_ASK = "Answer the question with a short phrase. Reply with the answer only."
SQUAD_READ = ("Read the passage, then answer the question with a short phrase copied from the passage. "
              "Reply with the answer only.")
# GSM8K prompts. "debate": the multiagent-debate prompts of Du et al. (2023), the NL baseline the paper
# compares with (first round, then "solutions from other agents"). "brief": ours, asks for short
# solutions so that a slow CPU can decode them within a small token budget.
GSM8K_STYLES = ("debate", "brief")
GSM8K_DEBATE = ("Can you solve the following math problem? {question} Explain your reasoning. Your final answer "
                "should be a single numerical number, in the form \\boxed{{answer}}, at the end of your response.")
GSM8K_DEBATE_READ = ("These are the solutions to the problem from other agents:\n\nOne agent solution: {message}\n\n"
                     "Using the solutions from other agents as additional information, can you provide your answer "
                     "to the math problem? The original math problem is {question} Your final answer should be a "
                     "single numerical number, in the form \\boxed{{answer}}, at the end of your response.")
GSM8K_BRIEF = ("Solve the math problem. Be brief: write only the calculations needed, one short line each, then "
               "give the final answer on the last line as 'Answer: <number>'.\n\nProblem: {question}")
GSM8K_BRIEF_READ = ("Solve the math problem. Be brief: write only the calculations needed, one short line each, then "
                    "give the final answer on the last line as 'Answer: <number>'.\n\nProblem: {question}\n\n"
                    "Another assistant's solution:\n{message}")


@dataclass
class TaskPrompts:
    """Texts for one task: what A reads, what B reads, the skyline, and B's prompt with A's message."""

    name: str
    ids: list[str]
    a: list[str]
    b: list[str]
    skyline: list[str] | None
    with_message: Callable[[int, str], str]
    score: Callable[[int, str], dict[str, float]]
    primary: str  # the score reported first: em | accuracy
    binary: tuple[str, ...]  # scores that are 0/1 per item (Wilson, McNemar)
    cue: str
    stop_strings: tuple[str, ...]
    golds: list[Any]


def squad_prompts(items: Sequence[Any], setting: str = "private") -> TaskPrompts:
    from pipeline.tasks.scoring import squad_scores

    def read(it):
        return f"{SQUAD_READ}\n\nPassage: {it.context}\n\nQuestion: {it.question}"

    def ask(it):
        return f"{SQUAD_ASK}\n\nQuestion: {it.question}"

    def with_message(i, message):
        it = items[i]
        note = f"Another assistant, who read a passage about this, answered: {message.strip()}\n\n"
        if setting == "shared":
            return f"{note}{SQUAD_READ}\n\nPassage: {it.context}\n\nQuestion: {it.question}"
        return f"{note}{SQUAD_ASK}\n\nQuestion: {it.question}"

    def score(i, text):
        em, f1 = squad_scores(text, items[i].answers)
        return {"em": em, "f1": f1}

    private = setting == "private"
    return TaskPrompts("squad", [it.id for it in items], [read(it) for it in items],
                       [ask(it) if private else read(it) for it in items],
                       [read(it) for it in items] if private else None, with_message, score, "em", ("em",),
                       "Answer:", ("\n",), [list(it.answers) for it in items])


def gsm8k_prompts(items: Sequence[Any], style: str = "debate") -> TaskPrompts:
    from pipeline.tasks.scoring import gsm8k_correct

    if style not in GSM8K_STYLES:
        raise UserError(f"GSM8K prompt style {style!r} is not one of {', '.join(GSM8K_STYLES)}")
    ask, read = (GSM8K_DEBATE, GSM8K_DEBATE_READ) if style == "debate" else (GSM8K_BRIEF, GSM8K_BRIEF_READ)

    def solve(it):
        return ask.format(question=it.question)

    def with_message(i, message):
        return read.format(question=items[i].question, message=message.strip())

    def score(i, text):
        return {"accuracy": gsm8k_correct(text, items[i].answer)}

    texts = [solve(it) for it in items]
    return TaskPrompts("gsm8k", [it.id for it in items], texts, list(texts), None, with_message, score, "accuracy",
                       ("accuracy",), "Solution:", (), [it.answer for it in items])


def task_prompts(task: str, cfg: EvaluateConfig, n: int | None = None) -> tuple[TaskPrompts, Decoding]:
    """Items loaded from the task's source, as prompts, with the task's decoding."""
    if task == "squad":
        from pipeline.tasks.squad import load_squad

        t = cfg.squad
        items = load_squad(t.source, n or t.n, t.seed)
        prompts = squad_prompts(items, t.setting)
    elif task == "gsm8k":
        from pipeline.tasks.gsm8k import load_gsm8k

        t = cfg.gsm8k
        items = load_gsm8k(t.source, n or t.n, t.seed)
        prompts = gsm8k_prompts(items, t.prompt)
    else:
        raise UserError(f"unknown task {task!r}: use squad or gsm8k")
    decoding = Decoding(max_new_tokens=t.max_new_tokens, sampling=t.sampling, top_p=t.top_p,
                        temperature=t.temperature, seed=t.seed, stop_strings=prompts.stop_strings)
    return prompts, decoding


# --- compute accounting ------------------------------------------------------------------------------

def block_flops(model: Any) -> tuple[float, float]:
    """(FLOPs per token per decoder block, FLOPs of one LM-head row): 2 x parameters (matmuls only)."""
    from pipeline.layers import decoder_layers

    blocks = decoder_layers(model)
    per_block = 2.0 * sum(p.numel() for p in blocks[0].parameters())
    head = model.get_output_embeddings()
    return per_block, 2.0 * (head.weight.numel() if head is not None else 0)


@dataclass
class Compute:
    a_tokens: int = 0  # prompt + generated tokens A ran
    a_blocks: int = 0  # decoder blocks A ran per token (k for AC, all for a full pass)
    b_tokens: int = 0
    a_new_tokens: int = 0
    b_new_tokens: int = 0
    flops: float = 0.0  # estimate: 2 x params of the blocks run per token + LM-head rows computed
    seconds: float = 0.0

    def add_run(self, pair_model: Any, role: str, gen_or_states: Any, blocks: int | None = None) -> None:
        from pipeline.layers import num_layers

        per_block, head = block_flops(pair_model)
        n_blocks = num_layers(pair_model) if blocks is None else blocks
        if isinstance(gen_or_states, Generation):
            prompt, new = sum(gen_or_states.prompt_tokens), sum(gen_or_states.new_tokens)
            heads = len(gen_or_states.prompt_tokens) + new  # one row per prefill + one per decoding step
            seconds = gen_or_states.seconds
        else:  # SenderStates: a partial pass, no LM head
            prompt, new, heads, seconds = gen_or_states.tokens, 0, 0, gen_or_states.seconds
        self.flops += per_block * n_blocks * (prompt + new) + head * heads
        self.seconds += seconds
        if role == "a":
            self.a_tokens += prompt + new
            self.a_new_tokens += new
            self.a_blocks = max(self.a_blocks, n_blocks)
        else:
            self.b_tokens += prompt + new
            self.b_new_tokens += new


# --- running the methods -------------------------------------------------------------------------------

@dataclass
class MethodRun:
    name: str
    texts: list[str]
    scores: dict[str, list[float]]
    compute: Compute


def _score_all(prompts: TaskPrompts, texts: Sequence[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for i, t in enumerate(texts):
        for key, value in prompts.score(i, t).items():
            out.setdefault(key, []).append(value)
    return out


def run_methods(pair: Pair, prompts: TaskPrompts, decoding: Decoding, cfg: EvaluateConfig, k: int, j: int,
                aligners: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> list[MethodRun]:
    """Every configured method on the same items; A's answer and A's layer-k states are computed
    once and reused (each method is still charged for them)."""
    aligners = aligners or {}
    log = log or (lambda s: None)
    bs, chat, n = cfg.batch_size, cfg.chat, len(prompts.ids)
    seeds = list(range(n))
    enc_a = [encode(pair.tok_a, t, chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.b]
    runs: list[MethodRun] = []

    def gen_b(ids) -> Generation:
        return generate(pair.model_b, pair.tok_b, ids, decoding, batch_size=bs, seeds=seeds)

    def add(name, gen, compute):
        runs.append(MethodRun(name, gen.texts, _score_all(prompts, gen.texts), compute))
        primary = runs[-1].scores[prompts.primary]
        log(f"{name}: {prompts.primary} {sum(primary) / max(1, n):.3f} ({compute.seconds:.1f}s)")

    if "b_alone" in cfg.methods:
        gen = gen_b(enc_b)
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        add("b_alone", gen, c)

    a_gen = None
    if "a_alone" in cfg.methods or "nl" in cfg.methods:
        a_gen = generate(pair.model_a, pair.tok_a, enc_a, decoding, batch_size=bs, seeds=seeds)
        if "a_alone" in cfg.methods:
            c = Compute()
            c.add_run(pair.model_a, "a", a_gen)
            add("a_alone", a_gen, c)
    if "nl" in cfg.methods:
        enc_nl = [encode(pair.tok_b, prompts.with_message(i, a_gen.texts[i]), chat, prompts.cue) for i in range(n)]
        gen = gen_b(enc_nl)
        c = Compute()
        c.add_run(pair.model_a, "a", a_gen)
        c.add_run(pair.model_b, "b", gen)
        add("nl", gen, c)

    if "ac" in cfg.methods:
        sent = sender_states(pair.model_a, pair.tok_a, enc_a, k, batch_size=bs)
        variants = [(f"ac_{f}", None, f) for f in cfg.modes]
        variants += [(f"ac_{name}_{f}", aligner, f) for name, aligner in aligners.items() for f in cfg.aligner_modes]
        for name, aligner, f in variants:
            t0 = time.perf_counter()
            vectors = map_vectors(sent.vectors, aligner, pair.width_b)
            map_s = time.perf_counter() - t0
            gen = communicate(pair.model_b, pair.tok_b, enc_b, j, vectors, f, decoding, batch_size=bs, seeds=seeds)
            c = Compute()
            c.add_run(pair.model_a, "a", sent, blocks=k)
            c.add_run(pair.model_b, "b", gen)
            c.seconds += map_s
            if aligner is not None:
                c.flops += 2.0 * n * pair.width_a * pair.width_b  # one matrix-vector product per item
            add(name, gen, c)
        del sent
    if "skyline" in cfg.methods and prompts.skyline is not None:
        gen = gen_b([encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.skyline])
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        add("skyline", gen, c)
    return runs


# --- summaries -------------------------------------------------------------------------------------------

def summarize(prompts: TaskPrompts, runs: Sequence[MethodRun], n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Per method: each score with a 95% interval, the compute, and paired comparisons against
    b_alone and nl (McNemar on binary scores, paired bootstrap on every score)."""
    from pipeline.stats import bootstrap_mean, mcnemar_exact, paired_bootstrap, wilson_interval

    by_name = {r.name: r for r in runs}
    out: dict[str, Any] = {}
    for r in runs:
        entry: dict[str, Any] = {"n": len(r.texts)}
        for key, values in r.scores.items():
            mean = sum(values) / len(values) if values else float("nan")
            if key in prompts.binary:
                lo, hi = wilson_interval(int(round(sum(values))), len(values))
                how = "wilson"
            else:
                lo, hi = bootstrap_mean(values, n_boot=n_boot, seed=seed)
                how = "bootstrap"
            entry[key] = {"mean": mean, "lo": lo, "hi": hi, "interval": how}
        entry["compute"] = asdict(r.compute)
        for ref in ("b_alone", "nl"):
            if ref == r.name or ref not in by_name:
                continue
            cmp: dict[str, Any] = {}
            for key, values in r.scores.items():
                other = by_name[ref].scores[key]
                c = {"paired_bootstrap": paired_bootstrap(values, other, n_boot=n_boot, seed=seed).to_json()}
                if key in prompts.binary:
                    c["mcnemar"] = mcnemar_exact(values, other).to_json()
                cmp[key] = c
            entry[f"vs_{ref}"] = cmp
        out[r.name] = entry
    return out


def format_table(summary: dict[str, Any], primary: str, secondary: str | None = None) -> str:
    """A Markdown table: score [95% interval], the secondary score, p vs B alone and vs NL, compute."""
    head = f"| method | {primary} [95% CI] |" + (f" {secondary} [95% CI] |" if secondary else "")
    head += " Δ vs B alone (p) | Δ vs NL (p) | A tokens | B tokens | GFLOP | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, e in summary.items():
        s = e[primary]
        row = f"| {name} | {100 * s['mean']:.1f} [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}] |"
        if secondary:
            s2 = e[secondary]
            row += f" {100 * s2['mean']:.1f} [{100 * s2['lo']:.1f}, {100 * s2['hi']:.1f}] |"
        for ref in ("vs_b_alone", "vs_nl"):
            c = e.get(ref, {}).get(primary)
            if c is None:
                row += " — |"
                continue
            p = c.get("mcnemar", c["paired_bootstrap"])["p_value"]
            row += f" {100 * c['paired_bootstrap']['diff']:+.1f} ({p:.3g}) |"
        comp = e["compute"]
        row += f" {comp['a_tokens']} | {comp['b_tokens']} | {comp['flops'] / 1e9:.1f} | {comp['seconds']:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def plot_scores(summary: dict[str, Any], key: str, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [100 * summary[m][key]["mean"] for m in names]
    # Wilson intervals always hold the mean; max() only absorbs rounding (matplotlib refuses a -1e-17)
    lo = [max(0.0, 100 * (summary[m][key]["mean"] - summary[m][key]["lo"])) for m in names]
    hi = [max(0.0, 100 * (summary[m][key]["hi"] - summary[m][key]["mean"])) for m in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel(f"{key} (%) with 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class TaskResult:
    task: str
    setting: str
    k: int
    j: int
    summary: dict[str, Any]
    runs: list[MethodRun]
    prompts: TaskPrompts
    info: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        return {"task": self.task, "setting": self.setting, "layers": {"k": self.k, "j": self.j},
                "primary": self.prompts.primary, "methods": self.summary, **self.info}

    def predictions(self) -> list[dict[str, Any]]:
        rows = []
        for i, item_id in enumerate(self.prompts.ids):
            row = {"id": item_id, "gold": self.prompts.golds[i]}
            for r in self.runs:
                row[r.name] = {"text": r.texts[i], **{k: v[i] for k, v in r.scores.items()}}
            rows.append(row)
        return rows

    def table(self) -> str:
        return format_table(self.summary, self.prompts.primary, "f1" if self.task == "squad" else None)


def evaluate_task(task: str, pair: Pair, cfg: EvaluateConfig, aligners: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, n: int | None = None) -> TaskResult:
    prompts, decoding = task_prompts(task, cfg, n)
    k, j = resolve_ks(pair, cfg.layer_a, cfg.layer_b)
    start = time.perf_counter()
    runs = run_methods(pair, prompts, decoding, cfg, k, j, aligners, log)
    summary = summarize(prompts, runs, n_boot=cfg.n_boot)
    setting = cfg.squad.setting if task == "squad" else "shared"
    info = {"n_items": len(prompts.ids), "models": {"a": pair.name_a, "b": pair.name_b},
            "decoding": asdict(decoding), "wall_seconds": time.perf_counter() - start}
    return TaskResult(task, setting, k, j, summary, runs, prompts, info)


# --- text-similarity probe --------------------------------------------------------------------------

def similarity_texts(cfg: SimilarityConfig, exclude: Sequence[str] = ()) -> list[str]:
    """n held-out sentences: a seeded sample of the source, minus every text in `exclude`
    (the corpus the aligners were fitted on)."""
    from pipeline.config import CorpusConfig
    from pipeline.data import load_corpus

    excluded = set(exclude)
    corpus = load_corpus(CorpusConfig(source=cfg.source, n=cfg.n + len(excluded), seed=cfg.seed,
                                      min_chars=cfg.min_chars, max_chars=cfg.max_chars))
    texts = [t for t in corpus.texts if t not in excluded][:cfg.n]
    if len(texts) < cfg.n:
        raise UserError(f"similarity probe: only {len(texts)} held-out sentences left in {cfg.source!r} "
                        f"(asked for {cfg.n}): lower evaluate.similarity.n")
    return texts


def similarity_probe(pair: Pair, texts: Sequence[str], k: int, j: int, modes: Sequence[str],
                     aligners: dict[str, Any] | None = None, batch_size: int = 16, n_boot: int = 10_000,
                     seed: int = 0, aligner_modes: Sequence[str] | None = None) -> dict[str, Any]:
    """How close B's run with A's grafted (mapped) state is to B's own run on the same text.

    For each variant (no aligner with each f in `modes`, each aligner with each f in `aligner_modes`,
    default `modes`): KL(p_B || p_graft) of the next-token
    distributions at the last token, cosine of B's last hidden state (layer L, pre final norm) with
    and without the graft, both as means with bootstrap intervals; the same with the vectors of
    other sentences (a fixed derangement) as a control; and how close the mapped vector itself is
    to B's own layer-j state (cosine, relative squared error)."""
    import torch

    from pipeline.layers import num_layers
    from pipeline.stats import bootstrap_mean

    aligners = aligners or {}
    n = len(texts)
    if n < 2:
        raise UserError("the similarity probe needs at least 2 sentences (the control shuffles them)")
    ids_a = [pair.tok_a(t, add_special_tokens=True)["input_ids"] for t in texts]
    ids_b = [pair.tok_b(t, add_special_tokens=True)["input_ids"] for t in texts]
    n_b = num_layers(pair.model_b)
    sent = sender_states(pair.model_a, pair.tok_a, ids_a, k, batch_size=batch_size)
    own = prefill(pair.model_b, pair.tok_b, ids_b, layers=sorted({j, n_b}), batch_size=batch_size)
    logp_own = torch.log_softmax(own["logits"], -1)
    h_own, b_j = own["states"][n_b], own["states"][j]
    perm = torch.roll(torch.arange(n), 1)  # every sentence gets another sentence's vector

    def interval(x):
        x = [float(v) for v in x]
        lo, hi = bootstrap_mean(x, n_boot=n_boot, seed=seed)
        return {"mean": sum(x) / len(x), "lo": lo, "hi": hi}

    out: dict[str, Any] = {}
    variants = [("none", None)] + list(aligners.items())
    for name, aligner in variants:
        v = map_vectors(sent.vectors, aligner, pair.width_b).float()
        m = min(v.shape[-1], b_j.shape[-1])
        vv, bb = v[:, -m:], b_j[:, -m:]
        entry: dict[str, Any] = {
            "vector_cosine": interval(torch.nn.functional.cosine_similarity(vv, bb, dim=-1)),
            "vector_rel_sq_error": interval(((vv - bb) ** 2).sum(-1) / (bb ** 2).sum(-1).clamp_min(1e-12))}
        for f in (modes if aligner is None or aligner_modes is None else aligner_modes):
            for label, vecs in (("matched", v), ("shuffled", v[perm])):
                run = prefill(pair.model_b, pair.tok_b, ids_b, layers=[n_b], inject_layer=j, vectors=vecs, mode=f,
                              batch_size=batch_size)
                logp = torch.log_softmax(run["logits"], -1)
                kl = (logp_own.exp() * (logp_own - logp)).sum(-1)
                cos = torch.nn.functional.cosine_similarity(run["states"][n_b], h_own, dim=-1)
                entry[f"{f}/{label}"] = {"kl": interval(kl), "cosine": interval(cos)}
        out[name] = entry
    return {"k": k, "j": j, "n": n, "variants": out}


def similarity_table(result: dict[str, Any]) -> str:
    lines = ["| aligner | f | KL matched [95% CI] | KL shuffled | cos matched [95% CI] | cos shuffled | vector cos |",
             "|---|---|---|---|---|---|---|"]
    for name, e in result["variants"].items():
        for key in e:
            if not key.endswith("/matched"):
                continue
            f = key.split("/")[0]
            m, s = e[key], e[f"{f}/shuffled"]
            lines.append(f"| {name} | {f} | {m['kl']['mean']:.3f} [{m['kl']['lo']:.3f}, {m['kl']['hi']:.3f}] | "
                         f"{s['kl']['mean']:.3f} | {m['cosine']['mean']:.3f} [{m['cosine']['lo']:.3f}, "
                         f"{m['cosine']['hi']:.3f}] | {s['cosine']['mean']:.3f} | {e['vector_cosine']['mean']:.3f} |")
    return "\n".join(lines)


def plot_similarity(result: dict[str, Any], path: Path) -> Path:
    """KL(p_B || p_graft) per aligner and f, matched against shuffled vectors, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, bars = [], {"matched": [], "shuffled": []}
    for name, e in result["variants"].items():
        for key in e:
            if key.endswith("/matched"):
                f = key.split("/")[0]
                labels.append(f"{name}/{f}")
                for which in bars:
                    kl = e[f"{f}/{which}"]["kl"]
                    bars[which].append((kl["mean"], max(0.0, kl["mean"] - kl["lo"]), max(0.0, kl["hi"] - kl["mean"])))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(labels) + 2), 3.6))
    width = 0.4
    for i, (which, vals) in enumerate(bars.items()):
        xs = [x + (i - 0.5) * width for x in range(len(labels))]
        ax.bar(xs, [v[0] for v in vals], width, yerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3,
               label=f"{which} vectors")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_ylabel("KL(B's own || B with graft), nats")
    ax.set_title(f"similarity probe, k={result['k']} j={result['j']}, n={result['n']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- (k, j) layer sweep ------------------------------------------------------------------------------

def layer_sweep(pair: Pair, prompts: TaskPrompts, decoding: Decoding, layers_a: Sequence[int], layers_b: Sequence[int],
                mode: str = "replace", batch_size: int = 16, chat: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plain AC (no aligner; the last-min(d_A, d_B)-coordinates rule) for every (k, j) in the grid,
    on the same items; plus B alone for reference. Grid of the primary score, rows k, columns j."""
    log = log or (lambda s: None)
    n = len(prompts.ids)
    seeds = list(range(n))
    enc_a = [encode(pair.tok_a, t, chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.b]
    base = generate(pair.model_b, pair.tok_b, enc_b, decoding, batch_size=batch_size, seeds=seeds)
    base_score = _mean(_score_all(prompts, base.texts)[prompts.primary])
    grid = [[math.nan] * len(layers_b) for _ in layers_a]
    for r, k in enumerate(layers_a):
        sent = sender_states(pair.model_a, pair.tok_a, enc_a, k, batch_size=batch_size)
        for c, j in enumerate(layers_b):
            gen = communicate(pair.model_b, pair.tok_b, enc_b, j, sent.vectors, mode, decoding,
                              batch_size=batch_size, seeds=seeds)
            grid[r][c] = _mean(_score_all(prompts, gen.texts)[prompts.primary])
            log(f"k={k} j={j}: {prompts.primary} {grid[r][c]:.3f}")
    return {"layers_a": list(layers_a), "layers_b": list(layers_b), "mode": mode, "n": n, "metric": prompts.primary,
            "grid": grid, "b_alone": base_score}


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if len(x) else math.nan


def plot_sweep(result: dict[str, Any], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = 100 * np.asarray(result["grid"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * grid.shape[1] + 1.5, 1.0 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), result["layers_b"])
    ax.set_yticks(range(grid.shape[0]), result["layers_a"])
    ax.set_xlabel("j (B's layer)")
    ax.set_ylabel("k (A's layer)")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{result['metric']} (%)  (B alone {100 * result['b_alone']:.0f})")
    ax.set_title(title or f"AC {result['mode']}, n = {result['n']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)
