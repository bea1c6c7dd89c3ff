"""Task items as prompts for A and B (with A's message, with the skyline's view), the scoring hook, and
the decoding each task uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pipeline.errors import UserError
from pipeline.generation import Decoding

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvaluateConfig


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
