"""Private-information coordination games (Ramesh & Li 2025, §4.1): A alone holds what B needs.

Each item has `prompt_a` (what only A sees), `prompt_b` (B's question), the gold answers, and
optionally the options B chooses from. Scores: exact match and F1 (SQuAD normalization, best over
the gold answers) and, where options exist, option accuracy (the option B names first is the gold
one). Sources:
  - "generate": our seeded offline generators, in the spirit of the paper's games:
      Countries   "<person> is at <place>." / "Which country is <person> in?"; places come from a
                  built-in table of real landmarks and cities whose names do not contain their country;
      Tip Sheets  tips on three fictional companies (one positive, one negative, one neutral) /
                  "invest in exactly one of <options>"; the answer is the company with the good tip.
  - a local .jsonl file with those fields ({"prompt_a", "prompt_b", "answer": str | [str],
    "options": [str] (optional), "id" (optional)}), so published datasets of this shape run unchanged.
Same seed, same items, on every machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.sampling import seeded_sample
from pipeline.tasks.base import Task, TaskConfig, TaskPrompts, disjoint


@dataclass(frozen=True)
class GameItem:
    id: str
    prompt_a: str  # only A sees it
    prompt_b: str  # B's question
    answers: tuple[str, ...]  # gold answers (aliases); the first is the canonical one
    options: tuple[str, ...] = ()  # what B picks from, when the game names options


# --- Countries ---------------------------------------------------------------------------------------

# (place, country): real landmarks and cities, each in exactly one country, none naming its country
# (tests/test_games.py checks both). Place-specific extra answers: the constituent country.
PLACES: tuple[tuple[str, str], ...] = (
    ("the Eiffel Tower", "France"), ("the Louvre", "France"), ("the Palace of Versailles", "France"),
    ("Mont Saint-Michel", "France"), ("Marseille", "France"),
    ("the Colosseum", "Italy"), ("the Leaning Tower of Pisa", "Italy"), ("Florence", "Italy"), ("Venice", "Italy"),
    ("the Acropolis", "Greece"), ("Athens", "Greece"), ("Santorini", "Greece"),
    ("Big Ben", "United Kingdom"), ("Stonehenge", "United Kingdom"), ("Buckingham Palace", "United Kingdom"),
    ("Edinburgh Castle", "United Kingdom"),
    ("the Statue of Liberty", "United States"), ("the Golden Gate Bridge", "United States"),
    ("the Grand Canyon", "United States"), ("Times Square", "United States"), ("Chicago", "United States"),
    ("the Sydney Opera House", "Australia"), ("Uluru", "Australia"), ("Melbourne", "Australia"),
    ("the Taj Mahal", "India"), ("the Red Fort", "India"), ("Mumbai", "India"),
    ("the Forbidden City", "China"), ("the Great Wall", "China"), ("Shanghai", "China"),
    ("Mount Fuji", "Japan"), ("Kyoto", "Japan"), ("Osaka", "Japan"),
    ("Machu Picchu", "Peru"), ("Lima", "Peru"),
    ("Christ the Redeemer", "Brazil"), ("Copacabana Beach", "Brazil"), ("Rio de Janeiro", "Brazil"),
    ("Chichen Itza", "Mexico"), ("Cancun", "Mexico"),
    ("the Pyramids of Giza", "Egypt"), ("Cairo", "Egypt"),
    ("the Sagrada Familia", "Spain"), ("the Alhambra", "Spain"), ("Barcelona", "Spain"),
    ("the Brandenburg Gate", "Germany"), ("Neuschwanstein Castle", "Germany"), ("Munich", "Germany"),
    ("the Kremlin", "Russia"), ("Red Square", "Russia"), ("the Hermitage Museum", "Russia"),
    ("Petra", "Jordan"), ("Angkor Wat", "Cambodia"),
    ("the CN Tower", "Canada"), ("Banff National Park", "Canada"), ("Vancouver", "Canada"), ("Toronto", "Canada"),
    ("the Blue Mosque", "Turkey"), ("Hagia Sophia", "Turkey"), ("Istanbul", "Turkey"),
    ("the Rijksmuseum", "Netherlands"), ("Amsterdam", "Netherlands"),
    ("the Atomium", "Belgium"), ("Bruges", "Belgium"),
    ("Tivoli Gardens", "Denmark"), ("Copenhagen", "Denmark"),
    ("the Burj Khalifa", "United Arab Emirates"), ("Dubai", "United Arab Emirates"),
    ("Table Mountain", "South Africa"), ("Cape Town", "South Africa"),
    ("Easter Island", "Chile"), ("Santiago", "Chile"),
    ("Marina Bay Sands", "Singapore"),
    ("the Petronas Towers", "Malaysia"), ("Kuala Lumpur", "Malaysia"),
    ("Mount Kilimanjaro", "Tanzania"), ("Zanzibar", "Tanzania"),
    ("the Cliffs of Moher", "Ireland"), ("Dublin", "Ireland"),
    ("Prague Castle", "Czech Republic"), ("the Charles Bridge", "Czech Republic"),
    ("Schönbrunn Palace", "Austria"), ("Vienna", "Austria"),
    ("Ha Long Bay", "Vietnam"), ("Hanoi", "Vietnam"),
    ("Gyeongbokgung Palace", "South Korea"), ("Seoul", "South Korea"),
    ("the Grand Palace in Bangkok", "Thailand"), ("Phuket", "Thailand"),
    ("Lisbon", "Portugal"), ("Porto", "Portugal"),
    ("Krakow", "Poland"), ("Warsaw", "Poland"),
    ("Budapest", "Hungary"), ("Stockholm", "Sweden"), ("Oslo", "Norway"), ("Helsinki", "Finland"),
    ("Zurich", "Switzerland"), ("Marrakesh", "Morocco"), ("Nairobi", "Kenya"), ("Buenos Aires", "Argentina"),
    ("Auckland", "New Zealand"), ("Havana", "Cuba"), ("Reykjavik", "Iceland"), ("Bogota", "Colombia"),
    ("Jakarta", "Indonesia"), ("Manila", "Philippines"), ("the Western Wall", "Israel"),
)
COUNTRY_ALIASES: dict[str, tuple[str, ...]] = {
    "United States": ("USA", "US", "United States of America", "America"),
    "United Kingdom": ("UK", "Britain", "Great Britain"),
    "Czech Republic": ("Czechia",),
    "United Arab Emirates": ("UAE",),
    "South Korea": ("Korea", "Republic of Korea"),
    "Netherlands": ("Holland",),
    "Turkey": ("Türkiye",),
}
PLACE_ALIASES: dict[str, tuple[str, ...]] = {  # answers right for one place only
    "Big Ben": ("England",), "Stonehenge": ("England",), "Buckingham Palace": ("England",),
    "Edinburgh Castle": ("Scotland",),
}
PEOPLE = ("Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hiro", "Ingrid", "Jamal", "Kofi", "Lena",
          "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tessa", "Umar", "Vera", "Wei", "Ximena",
          "Yusuf", "Zoe")


def countries_items(n: int, seed: int = 0) -> list[GameItem]:
    """n distinct (person, place) items, drawn by seed."""
    pairs = [(p, place) for p in PEOPLE for place in PLACES]
    chosen = random.Random(f"xmodel-countries-{seed}").sample(pairs, min(n, len(pairs)))
    items = []
    for i, (person, (place, country)) in enumerate(chosen):
        answers = (country, *COUNTRY_ALIASES.get(country, ()), *PLACE_ALIASES.get(place, ()))
        items.append(GameItem(f"countries-{seed}-{i}", f"{person} is at {place}.",
                              f"Which country is {person} in? Answer with the name of the country only.", answers))
    return items


# --- Tip Sheets --------------------------------------------------------------------------------------

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io")
_ENDINGS = ("x", "n", "ra", "lia", "tor", "vo", "nix", "ro", "mex", "dia")
_SUFFIXES = ("Corp", "Labs", "Industries", "Systems", "Holdings", "Dynamics", "Foods", "Energy")
TIPS = {
    "positive": ("{c} just reported record profits and raised its forecast for next year.",
                 "{c} won a large government contract and its orders have doubled.",
                 "Analysts expect {c}'s new product to dominate its market; its sales are soaring.",
                 "{c} cut its debt in half and its profit margins are the best in its industry."),
    "negative": ("{c} is under investigation for accounting fraud and may go bankrupt.",
                 "{c} lost its biggest customer and is laying off half of its staff.",
                 "{c}'s main product was recalled as unsafe and its sales have collapsed.",
                 "{c} has missed its loan payments and its auditors have resigned."),
    "neutral": ("{c} moved its headquarters to a new office building this year.",
                "{c} changed the colour of its logo from blue to green.",
                "{c} will hold its annual meeting in the spring, as usual.",
                "{c} appointed a new head of its internal communications team."),
}


def _company(rng: random.Random) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2)))
    return f"{(word + rng.choice(_ENDINGS)).capitalize()} {rng.choice(_SUFFIXES)}"


def tipsheets_items(n: int, seed: int = 0) -> list[GameItem]:
    """n items of three fictional companies each; the tips and the options are listed in two
    independent random orders, so neither order gives the answer away."""
    rng = random.Random(f"xmodel-tipsheets-{seed}")
    items = []
    for i in range(n):
        names: list[str] = []
        while len(names) < 3:  # three different first words, so an answer names one company only
            c = _company(rng)
            if c.split()[0] not in {x.split()[0] for x in names}:
                names.append(c)
        tips = [rng.choice(TIPS[kind]).format(c=c) for kind, c in zip(("positive", "negative", "neutral"), names)]
        order, options = rng.sample(range(3), 3), rng.sample(names, 3)
        sheet = "Investment tips:\n" + "\n".join(f"- {tips[k]}" for k in order)
        ask = (f"You must invest in exactly one of these companies: {', '.join(options[:2])} or {options[2]}. "
               "Which company do you invest in? Answer with the company's name only.")
        items.append(GameItem(f"tipsheets-{seed}-{i}", sheet, ask, (names[0], names[0].split()[0]), tuple(options)))
    return items


GENERATORS = {"countries": countries_items, "tipsheets": tipsheets_items}


# --- local .jsonl ------------------------------------------------------------------------------------

def read_games_jsonl(path: Path) -> list[GameItem]:
    """Items of a .jsonl file: one JSON object per line with prompt_a, prompt_b, answer (a string or a
    list of strings), and optionally options (a list of at least two strings holding the answer) and id."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None
    items, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}): one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: a {type(row).__name__}, expected a JSON object with prompt_a, prompt_b, answer")
        for key in ("prompt_a", "prompt_b"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string")
        answers = row.get("answer")
        answers = [answers] if isinstance(answers, str) else answers
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise UserError(f"{where}: 'answer' must be a non-empty string or a list of non-empty strings")
        options = row.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
            raise UserError(f"{where}: 'options' must be a list of non-empty strings")
        if options and (len(options) < 2 or option_choice(answers[0], options) is None):
            raise UserError(f"{where}: 'options' must list at least two choices, the answer {answers[0]!r} among them")
        item_id = str(row.get("id", f"{Path(path).stem}-{n}"))
        if item_id in seen:
            raise UserError(f"{where}: id {item_id!r} appears twice: ids must be unique")
        seen.add(item_id)
        items.append(GameItem(item_id, row["prompt_a"], row["prompt_b"], tuple(answers), tuple(options)))
    if not items:
        raise UserError(f"{path}: holds no item")
    return items


def load_game(game: str, source: str, n: int, seed: int = 0) -> list[GameItem]:
    """`n` items of `game` from its generator ("generate") or a seeded sample of a .jsonl file."""
    if n < 1:
        raise UserError(f"n = {n} items: ask for at least 1")
    if source == "generate":
        return GENERATORS[game](n, seed)
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        raise UserError(f"{game} source {source!r}: expected 'generate' or an existing .jsonl file")
    return seeded_sample(read_games_jsonl(path), n, seed)


# --- scoring and prompts -----------------------------------------------------------------------------

def option_choice(text: str, options: Sequence[str]) -> str | None:
    """The option that `text` names first (normalized words, whole-word match; on a tie at the same
    position the longer option), or None when it names none."""
    from pipeline.tasks.scoring import clean_prediction, normalize_answer

    said = f" {normalize_answer(clean_prediction(text) or text)} "
    best: tuple[int, int, str] | None = None
    for opt in options:
        at = said.find(f" {normalize_answer(opt)} ")
        if at >= 0 and (best is None or (at, -len(opt)) < best[:2]):
            best = (at, -len(opt), opt)
    return best[2] if best else None


def game_prompts(name: str, items: Sequence[GameItem]) -> TaskPrompts:
    """A reads prompt_a; B reads prompt_b; the skyline reads both; NL shows B A's message."""
    has_options = all(it.options for it in items) and bool(items)

    def with_message(i, message):
        return f"Your partner, who knows something you do not, told you: {message.strip()}\n\n{items[i].prompt_b}"

    def score(i, text):
        from pipeline.tasks.scoring import squad_scores

        it = items[i]
        em, f1 = squad_scores(text, it.answers)
        out = {"em": em, "f1": f1}
        if has_options:
            out["option"] = float(option_choice(text, it.options) == option_choice(it.answers[0], it.options))
        return out

    columns = ("option", "em", "f1") if has_options else ("em", "f1")
    return TaskPrompts(name, [it.id for it in items], [it.prompt_a for it in items], [it.prompt_b for it in items],
                       [f"{it.prompt_a}\n\n{it.prompt_b}" for it in items], with_message, score, columns[0],
                       tuple(c for c in columns if c != "f1"), "Answer:", ("\n",), [list(it.answers) for it in items],
                       columns=columns, setting="private")


@dataclass(frozen=True)
class GameConfig(TaskConfig):
    source: str = "generate"  # generate (our seeded generator) | path to a .jsonl of prompt_a, prompt_b, answer[, options]
    max_new_tokens: int = 12  # answers are a few words; generation also stops at the first newline


def _builder(game: str):
    def build(cfg: GameConfig, n: int | None, exclude: frozenset[str]) -> TaskPrompts:
        items = disjoint(lambda k: load_game(game, cfg.source, k, cfg.seed), n or cfg.n, exclude,
                         lambda it: it.prompt_a)
        return game_prompts(game, items)
    return build


COUNTRIES = Task("countries", GameConfig, _builder("countries"),
                 "private-information game: A knows where a person is, B is asked which country")
TIPSHEETS = Task("tipsheets", GameConfig, _builder("tipsheets"),
                 "private-information game: A holds tips on three companies, B picks one to invest in")
