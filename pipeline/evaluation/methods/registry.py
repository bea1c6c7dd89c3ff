"""Every communication method, by the name `evaluate.methods` uses: one line each, in the order they
run (the skyline first, so that every B run can be compared with its first-token distribution).
A new method is one module (a `Method` subclass, pipeline/evaluation/methods/base.py) and one line here."""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.evaluation.methods.ac import ActivationCommunication, MultiVectorAC
from pipeline.evaluation.methods.base import Method
from pipeline.evaluation.methods.fuser import LearnedFuser
from pipeline.evaluation.methods.kv import KvCommunication
from pipeline.evaluation.methods.mapped_kv import MappedKV
from pipeline.evaluation.methods.reference import AAlone, BAlone, NaturalLanguage, Skyline

METHODS: dict[str, Method] = {m.name: m for m in (
    Skyline(),
    BAlone(),
    AAlone(),
    NaturalLanguage(),
    ActivationCommunication(),
    MultiVectorAC(),
    KvCommunication(),
    MappedKV(),
    LearnedFuser(),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown communication method {name!r}: use one of {', '.join(METHODS)} "
                        "(`xmodel methods` lists what each needs)")
    return METHODS[name]
