"""Stage `extract@<role>`: run one model over the corpus into its activation store."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks). A task corpus
# (corpus.source task:<name>) also reads evaluate.<name> and evaluate.chat: a key params chooses,
# which dvc.yaml cannot name, so they reach DVC through data/inputs/corpus.json (pipeline/inputs.py)
PARAMS = ("corpus", "extract", "models.${item}")


def run(params: Params, role: str, out: Path | None = None, force: bool = False, quiet: bool = False):
    from pipeline import headlines
    from pipeline.artifacts import layout, write_record
    from pipeline.distributed import is_main
    from pipeline.extract import run_extract
    from pipeline.task_corpus import corpus_for
    from store.verify import store_info

    paths, name = layout(params), f"extract-{role}"
    spec = params.model_spec(role)  # an unknown role is refused before the corpus is read
    corpus = corpus_for(params.corpus, params.evaluate, role)  # a task corpus gives each role its own view
    result = run_extract(spec, role, corpus, params.extract, params.paths.cache_dir(),
                         Path(out) if out else paths.store(role), force=force, quiet=quiet)
    # a store found complete (e.g. built earlier under torchrun) still gets its record, which the DVC
    # stage declares; its speed is known only to the run that wrote it
    missing = not (paths.metrics(name).exists() and paths.details(name).exists())
    if out is None and is_main() and (result.status == "written" or missing):
        info = store_info(result.path)
        details = {"n_seq": info["attrs"]["n_seq"], "n_tok": info["attrs"]["n_tok"],
                   "layers": info["attrs"]["layers"], "bytes_on_disk": info["bytes_on_disk"],
                   "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else None,
                   "seconds": round(result.seconds, 1) if result.seconds else None}
        write_record(paths, name, details, headlines.extract)
    return result
