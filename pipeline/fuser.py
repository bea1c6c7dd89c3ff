"""The learned fuser (issue 19, item 3): Cache-to-Cache made small, B frozen.

What it is. For each of B's decoder blocks l (KV layer l in 1..L_B, whose input is B's residual
stream after layer l - 1), A's per-token states at the layer of matching relative depth,
a(l) = round((l - 1) / L_B * L_A) (pipeline.layers.resolve_layers), are mapped into B's residual
space by a rank-r affine map, then turned into that block's keys and values by B's own weights
(pipeline.evaluation.statekv: input norm, k/v projections, k_norm, rotary at positions 0..P_A-1):

    m_l(x) = ((x - mu_a) / sd_a) U_l V_l + c_l          U_l: d_A x r, V_l: r x d_B, c_l: d_B
    keys_l, values_l = statekv.block_kv(B, l, m_l(x));   values_l *= sigmoid(g_l)

B attends to that prefix at every layer, exactly as in `kv` (pipeline.evaluation.kv): the prefix at
positions 0..P_A-1, B's prompt from P_A. The gate g_l is one learned scalar per layer scaling the
prefix's values (our design): it is what kv_generate can run unchanged, since a KvCache holds keys and
values only. At gate 0 the prefix adds no content to B's residual stream; its keys still take
attention mass, which the training loss sees too (the maps can learn keys B barely attends to).
mu_a, sd_a (per A layer and dimension) are fixed at initialisation; only U, V, c and g train.

Initialisation (least squares, no B in the loop). On the training texts A reads, A's and B's states
are paired by character offsets across tokenizers (pipeline.pairing.pair_tokens); for each B layer
the ridge regression of B's residual entering block l on A's standardized states at a(l) is fitted
from accumulated second moments, then cut to rank r by reduced-rank regression (the fitted values'
top-r principal directions: the best rank-r least-squares map). Gates start at sigmoid(gate_init).

Training (B frozen, both models in eval mode). B's next-token cross-entropy of a target given the
fuser's prefix and B's prompt, summed over target tokens and averaged per token, Adam on the fuser's
parameters only. Two variants (`xmodel fuse task|prose`, one DVC stage each):
  task   items of `fuse.task` drawn with `fuse.seed`, never an item the evaluation reads (by A's
         prompt), from the train places where the task has a place split; A reads prompt_a, B its
         prompt_b, and the target is B's greedy answer on the skyline prompt (the teacher: what B says
         when it has seen A's information; not the gold answer, whose wording B may never produce)
  prose  the corpus texts (params corpus, seed fuse.seed): A reads the first half of a text, B is
         given the first token of the second half and the target is the rest of it (at most
         answer_tokens), the text itself as teacher
The last n_heldout items are held out: their loss is the early-stopping signal and the reported score,
beside B alone's loss on the same targets (no prefix) and the initial (least-squares) fuser's.

Resuming. A checkpoint (pipeline.aligners.training.Checkpoint: weights, best weights, Adam state,
RNG, counters) is written atomically after every epoch into <dir>/ckpt; each epoch's batch order is
a pure function of (seed, epoch), so a run killed at any point and rerun gives the uninterrupted
run's result. A non-finite loss stops training with one line, and nothing is written.

At evaluation (the method registry):

    fuser = load_fuser(name_or_dir, data_dir); fuser.check(pair)
    states = token_states(model_a, tok_a, prompts_a, fuser.a_layers).states   # pipeline.injection:
                                                                # {A layer: [(P_i, d_A) per item]}
    cache = fuser.cache(model_b, states)                        # a kv.KvCache for B
    gen = kv_generate(model_b, tok_b, prompts_b, cache, fuser.b_layers, decoding)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import UserError

WEIGHTS = "weights.safetensors"
CONFIG = "fuser.json"
FORMAT = 1


# ---------------------------------------------------------------------------------------------
# The module


def layer_sources(n_layers_a: int, n_layers_b: int) -> list[int]:
    """A's layer for each of B's KV layers 1..L_B: B's block l reads the residual after l - 1, so
    the A layer at the same relative depth (l - 1) / L_B (rounded half up, pipeline.layers)."""
    from pipeline.layers import resolve_layers

    return [resolve_layers([(l - 1) / n_layers_b], n_layers_a)[0] for l in range(1, n_layers_b + 1)]


def build_net(n_layers_b: int, d_a: int, d_b: int, rank: int) -> Any:
    """The fuser's tensors, stacked over B's layers (zeros: weights come from init or a file)."""
    import torch

    shapes = {"u": (n_layers_b, d_a, rank), "v": (n_layers_b, rank, d_b), "c": (n_layers_b, d_b),
              "gate": (n_layers_b,), "mu": (n_layers_b, d_a), "sd": (n_layers_b, d_a)}
    return torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(s), requires_grad=k not in ("mu", "sd"))
                                   for k, s in shapes.items()})


class Fuser:
    """A fuser's tensors (`net`) and what they were made for (`meta`: sources, dims, models, config)."""

    def __init__(self, net: Any, meta: dict[str, Any]):
        self.net, self.meta = net, meta

    @property
    def sources(self) -> list[int]:
        return [int(x) for x in self.meta["sources"]]

    @property
    def a_layers(self) -> list[int]:
        """A's layers the fuser reads (project convention: 0 = embeddings, l = output of block l)."""
        return sorted(set(self.sources))

    @property
    def b_layers(self) -> list[int]:
        """B's KV layers the prefix is shared at (all of them): kv_generate's `layers`."""
        return list(range(1, len(self.sources) + 1))

    def flops_per_a_token(self, model_b: Any) -> float:
        """Matmul FLOPs the fuser adds per token of A's prompt: each B layer's rank-r map and B's own
        key/value projections of the mapped state (B's attention to the prefix is kv_compute's)."""
        from pipeline.evaluation.statekv import kv_flops_per_token

        rank, d_a, d_b = self.net["u"].shape[2], int(self.meta["d_a"]), int(self.meta["d_b"])
        return (2.0 * (d_a * rank + rank * d_b) + kv_flops_per_token(model_b)) * len(self.sources)

    @property
    def gates(self) -> list[float]:
        import torch

        return torch.sigmoid(self.net["gate"].detach()).tolist()

    def mapped(self, layer: int, x: Any) -> Any:
        """B-space states entering KV layer `layer` (1..L_B) from A's states x (rows, d_A) at its
        source layer: (rows, d_B), float32."""
        import torch

        net, k = self.net, layer - 1
        x = x.to(device=net["u"].device, dtype=torch.float32)
        return ((x - net["mu"][k]) / net["sd"][k]) @ net["u"][k] @ net["v"][k] + net["c"][k]

    def cache(self, model_b: Any, states: dict[int, Sequence[Any]], grad: bool = False) -> Any:
        """B's KvCache (pipeline.evaluation.kv) from A's per-token states {A layer: [(P_i, d_A) per
        item]} (at least `a_layers`): the mapped states' keys and values at every B layer, values
        scaled by the layer's gate; every item's rows mapped in one product per layer
        (statekv.packed_cache). Without `grad`, computed under no_grad (evaluation)."""
        import torch

        from pipeline.evaluation.statekv import item_lengths, map_precision, packed_cache, packed_rows

        missing = [l for l in self.a_layers if l not in states]
        if missing:
            raise ValueError(f"the fuser reads A's layers {self.a_layers}; states lack {missing}")
        rows, sources = packed_rows(states), self.sources

        def build() -> Any:
            return packed_cache(model_b, item_lengths({la: states[la] for la in self.a_layers}), self.b_layers,
                                lambda l: self.mapped(l, rows(sources[l - 1])),
                                value_scale=torch.sigmoid(self.net["gate"]))
        if grad:
            return build()  # training: full float32 maps (map_precision only where nothing is learned)
        with torch.no_grad(), map_precision(model_b):
            return build()

    def check(self, pair: Any) -> None:
        """Refuse models this fuser was not trained for (widths, depths, and content shas when known)."""
        from pipeline.architecture import architecture

        m = self.meta
        have = {"d_a": pair.width_a, "d_b": pair.width_b, "layers_a": architecture(pair.model_a).n_layers,
                "layers_b": architecture(pair.model_b).n_layers}
        bad = [f"{k} {m.get(k)} vs {v}" for k, v in have.items() if m.get(k) != v]
        for role, sha in (("a", pair.sha_a), ("b", pair.sha_b)):
            theirs = (m.get("models") or {}).get(role, {}).get("sha")
            if sha and theirs and sha != theirs:
                bad.append(f"model {role.upper()} sha {str(theirs)[:12]} vs {sha[:12]}")
        if bad:
            raise UserError(f"fuser {m.get('variant')} was trained for other models ({', '.join(bad)}): "
                            f"retrain it on these (`xmodel fuse {m.get('variant')} --force`)")

    # -- persistence --------------------------------------------------------------------------
    def stage_save(self, out: Any, directory: Path) -> None:
        """Add the fuser folder (weights.safetensors + fuser.json) to a stage's pending Outputs."""
        from safetensors.torch import save

        from pipeline.artifacts import raw_write

        state = {k: v.detach().cpu().contiguous() for k, v in self.net.items()}
        weights = save(state)
        text = json.dumps({"format": FORMAT, **self.meta}, indent=2, sort_keys=True, default=str) + "\n"

        def build(tmp: Path) -> None:
            raw_write(tmp / WEIGHTS, weights)
            raw_write(tmp / CONFIG, text)

        out.directory(directory, build, is_fuser_dir, "fuser directory")


def is_fuser_dir(path: Path) -> bool:
    """A folder xmodel wrote (or began, a checkpoint) as a fuser: only its files and ckpt/."""
    names = {p.name for p in path.iterdir()}
    return names <= {WEIGHTS, CONFIG, "ckpt"} | {n for n in names if ".tmp" in n}


def load_fuser(name: str | Path, data_dir: str | Path = "data") -> Fuser:
    """A trained fuser: a folder with fuser.json, or a variant name under <data_dir>/fusers/."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.aligners.base import read_json
    from pipeline.artifacts import Layout, shared

    path = Path(name).expanduser()
    if not (path / CONFIG).is_file():
        path = Layout(Path(data_dir)).fuser(str(name))
    path = path.absolute()
    # read under the readers' side of the lock `xmodel fuse` writes under: never a folder half replaced
    lock = Layout(path.parent.parent).lock(f"fusers/{path.name}") if path.parent.name == "fusers" else None
    with shared(lock, path):
        meta = read_json(path / CONFIG, f"{path} holds no trained fuser (no {CONFIG}): run `xmodel fuse {path.name}`")
        if meta.pop("format", None) != FORMAT:
            raise UserError(f"{path / CONFIG}: not a fuser of format {FORMAT}: retrain it (`xmodel fuse ... --force`)")
        try:
            state = load_file(str(path / WEIGHTS))
            net = build_net(len(meta["sources"]), int(meta["d_a"]), int(meta["d_b"]), int(meta["config"]["rank"]))
            net.load_state_dict(state, strict=True)
        except (SafetensorError, OSError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}): retrain it "
                            "(`xmodel fuse ... --force`)") from None
    if not all(bool(v.isfinite().all()) for v in state.values()):
        raise UserError(f"{path / WEIGHTS} holds non-finite weights: retrain it with a lower fuse.lr")
    net.requires_grad_(False)
    return Fuser(net, meta)


# ---------------------------------------------------------------------------------------------
# Training data


@dataclass(frozen=True)
class Example:
    a_text: str  # the text A reads, raw (least-squares initialisation pairs tokens on it)
    a_ids: list[int]  # what A reads, as evaluation encodes it
    b_prompt: list[int]  # what B reads after the prefix
    target: list[int]  # the tokens B is trained to produce next


def task_examples(cfg: Any, evaluate: Any, model_b: Any, tok_a: Any, tok_b: Any, log: Callable[[str], None]) -> list[Example]:
    """n_train + n_heldout items of cfg.task, disjoint from the evaluation's (by A's prompt), from the
    train places where the task splits its places; target: B's greedy skyline answer."""
    from dataclasses import replace

    from pipeline.encoding import encode
    from pipeline.evaluation.prompts import decoding_for
    from pipeline.generation import generate
    from pipeline.tasks.registry import get_task

    task, section = get_task(cfg.task), evaluate.section(cfg.task)
    held = frozenset(task.prompts(section).a)  # exactly what evaluate@<task> reads
    train = replace(section, seed=cfg.seed, **({"places": "train"} if hasattr(section, "places") else {}))
    n = cfg.n_train + cfg.n_heldout
    prompts = task.prompts(train, n, exclude=held)
    if len(prompts.ids) < n:
        raise UserError(f"fuse: task {cfg.task} gives only {len(prompts.ids)} items outside its {len(held)} "
                        f"evaluation items, fewer than fuse.n_train + fuse.n_heldout = {n}: ask for fewer")
    chat, cue = evaluate.chat, prompts.cue
    sky = [encode(tok_b, t, chat, cue) for t in (prompts.skyline or prompts.b)]
    decoding = decoding_for(train, prompts)
    t0 = time.perf_counter()
    teacher = generate(model_b, tok_b, sky, decoding, batch_size=cfg.batch_size)
    log(f"teacher: B's skyline answers to {n} items ({time.perf_counter() - t0:.1f}s)")
    return [Example(prompts.a[i], encode(tok_a, prompts.a[i], chat, cue), encode(tok_b, prompts.b[i], chat, cue),
                    list(teacher.tokens[i][:cfg.answer_tokens])) for i in range(n)]


def prose_examples(cfg: Any, corpus: Any, tok_a: Any, tok_b: Any) -> list[Example]:
    """n_train + n_heldout corpus texts (seed fuse.seed), each cut at the space nearest its middle:
    A reads the first half; B is given the second half's first token and trained on the rest."""
    from dataclasses import replace

    from pipeline.data import load_corpus

    n = cfg.n_train + cfg.n_heldout
    texts = load_corpus(replace(corpus, n=n, seed=cfg.seed)).texts
    out = []
    for text in texts:
        spaces = [i for i, ch in enumerate(text) if ch == " "]
        if not spaces:
            continue
        cut = min(spaces, key=lambda i: abs(i - len(text) // 2))
        first, second = text[:cut], text[cut:]
        b = tok_b(second, add_special_tokens=True)["input_ids"]
        lead = len(tok_b(second[:0], add_special_tokens=True)["input_ids"]) + 1  # specials, then one token
        if len(b) <= lead:
            continue
        out.append(Example(first, list(tok_a(first, add_special_tokens=True)["input_ids"]), list(b[:lead]),
                           list(b[lead:lead + cfg.answer_tokens])))
    if len(out) < n:
        raise UserError(f"fuse: the corpus gives {len(out)} usable texts for the prose fuser, fewer than "
                        f"fuse.n_train + fuse.n_heldout = {n}: ask for fewer or use a larger corpus")
    return out


# ---------------------------------------------------------------------------------------------
# Least-squares initialisation


def init_fuser(model_a: Any, tok_a: Any, model_b: Any, tok_b: Any, texts: Sequence[str], rank: int, ridge: float,
               gate_init: float, batch_size: int) -> tuple[Any, dict[str, Any]]:
    """The fuser's tensors by reduced-rank ridge regression of B's residual entering each block on
    A's standardized states at the matching depth, over tokens paired by character offsets."""
    import numpy as np
    import torch

    from pipeline.architecture import architecture
    from pipeline.injection import token_states
    from pipeline.pairing import Pairs, TokenIndex, pair_tokens

    la, lb = architecture(model_a).n_layers, architecture(model_b).n_layers
    sources = layer_sources(la, lb)
    enc = {}
    for role, tok in (("a", tok_a), ("b", tok_b)):
        rows = [tok(t, add_special_tokens=True, return_offsets_mapping=True) for t in texts]
        ends = [np.array([e if e > s else 0 for s, e in r["offset_mapping"]], dtype=np.int64) for r in rows]
        lens = np.array([len(e) for e in ends])
        index = TokenIndex(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens, np.concatenate(ends))
        enc[role] = ([list(r["input_ids"]) for r in rows], index)
    seqs = np.arange(len(texts))
    pairs = pair_tokens(enc["a"][1], enc["b"][1], Pairs(seqs, seqs, seqs))
    if len(pairs) < 2:
        raise UserError(f"fuse: only {len(pairs)} tokens of A and B end at the same character of the "
                        "training texts: nothing to initialise the maps from")
    sa = token_states(model_a, tok_a, enc["a"][0], sources, batch_size=batch_size).states
    sb = token_states(model_b, tok_b, enc["b"][0], range(lb), batch_size=batch_size).states
    cat = lambda d: {l: torch.cat(v).double() for l, v in d.items()}  # noqa: E731  token rows, text order
    sa, sb = cat(sa), cat(sb)
    ra, rb = torch.from_numpy(pairs.rows_a), torch.from_numpy(pairs.rows_b)
    d_a, d_b = sa[sources[0]].shape[1], sb[0].shape[1]
    net = build_net(lb, d_a, d_b, rank)
    r2 = []
    with torch.no_grad():
        net["gate"].fill_(gate_init)
        for k, src in enumerate(sources):
            x, y = sa[src][ra], sb[k][rb]
            mu, sd = x.mean(0), x.std(0)
            sd = torch.sqrt(sd ** 2 + 1e-6 * float((sd ** 2).mean()) + 1e-12)
            xs, yc = (x - mu) / sd, y - y.mean(0)
            gram = xs.T @ xs / len(xs)
            w = torch.linalg.solve(gram + ridge * torch.eye(d_a, dtype=gram.dtype), xs.T @ yc / len(xs))
            fitted = xs @ w
            _, _, vh = torch.linalg.svd(fitted, full_matrices=False)  # principal directions of the fit
            v = vh[:rank].T  # (d_b, r')
            u = w @ v
            r = v.shape[1]
            net["u"][k, :, :r], net["v"][k, :r] = u.float(), v.T.float()
            net["c"][k], net["mu"][k], net["sd"][k] = y.mean(0).float(), mu.float(), sd.float()
            resid = yc - xs @ u @ v.T
            r2.append(1.0 - float(resid.square().sum() / yc.square().sum().clamp_min(1e-30)))
    return net, {"init_tokens": len(pairs), "init_texts": len(texts), "init_r2": r2}


# ---------------------------------------------------------------------------------------------
# Loss


def batch_loss(fuser: Fuser | None, model_a: Any, tok_a: Any, model_b: Any, tok_b: Any,
               batch: Sequence[Example]) -> tuple[Any, int]:
    """(summed cross-entropy of the targets, target tokens) for a batch: B reads the fuser's prefix
    (none when fuser is None: B alone) then its prompt; differentiable in the fuser's tensors."""
    import torch
    import torch.nn.functional as F

    from pipeline.evaluation.kv import _prefix
    from pipeline.generation import left_pad
    from pipeline.injection import token_states

    device = next(model_b.parameters()).device
    seqs = [e.b_prompt + e.target for e in batch]
    ids, mask, pos = left_pad(seqs, tok_b.pad_token_id if tok_b.pad_token_id is not None else 0, device)
    longest = max(len(e.target) for e in batch)
    labels = torch.full((len(batch), longest + 1), -100, dtype=torch.long, device=device)
    for r, e in enumerate(batch):
        # logits column c predicts token c + 1; targets end every (left-padded) row
        labels[r, longest - len(e.target):longest] = torch.tensor(e.target, device=device)
    kwargs: dict[str, Any] = {}
    if fuser is not None:
        states = token_states(model_a, tok_a, [e.a_ids for e in batch], fuser.a_layers, batch_size=len(batch)).states
        past = _prefix(fuser.cache(model_b, states, grad=True), list(range(len(batch))), device)
        mask = torch.cat([past.mask.to(mask), mask], dim=1)
        pos = pos + past.offsets[:, None]
        kwargs = {"cache": past.cache, "use_cache": True}
    logits = model_b(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=longest + 1, **kwargs).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


def mean_loss(fuser: Fuser | None, model_a: Any, tok_a: Any, model_b: Any, tok_b: Any, examples: Sequence[Example],
              batch_size: int) -> float:
    """Per-token cross-entropy of the examples' targets (no gradient)."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            loss, n = batch_loss(fuser, model_a, tok_a, model_b, tok_b, examples[s:s + batch_size])
            total, tokens = total + float(loss), tokens + n
    return total / max(1, tokens)
