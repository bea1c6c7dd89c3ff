"""Private-information coordination games (Ramesh & Li 2025, §4.1): A alone holds what B needs.

Each item has `prompt_a` (what only A sees), `prompt_b` (B's question), the gold answers, and
optionally the options B chooses from. Scores: exact match and F1 (SQuAD normalization, best over
the gold answers) and, where options exist, option accuracy (the option B names first is the gold
one), and answer-contained accuracy (a gold answer appears in the reply: the papers' "accuracy").
Sources:
  - "generate": our seeded offline generators, in the spirit of the paper's games:
      Countries   "<person> is at <place>." / "Which country is <person> in?"; places come from a
                  built-in table of real landmarks and cities whose names do not contain their country,
                  split once into train and evaluation places (`places`, see PLACE_SPLIT);
      Tip Sheets  tips on three fictional companies (one positive, one negative, one neutral) /
                  "invest in exactly one of <options>"; the answer is the company with the good tip.
  - a local file (.jsonl, .json, .parquet, .csv) in our layout ({"prompt_a", "prompt_b", "answer":
    str | [str], "options": [str], "accept": str | [str], "id"}, the last three optional), in the
    KVComm project's published layouts (recognised by their fields), or in any layout that
    `evaluate.<game>.fields` maps (pipeline/tasks/rows.py).
Same seed, same items, on every machine.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config_tasks import PLACE_SPLITS, CountriesConfig, GameConfig
from pipeline.errors import UserError
from pipeline.sampling import seeded_sample
from pipeline.tasks.base import Task, TaskPrompts, disjoint
from pipeline.tasks.rows import Layout, Rows, distinct_keys, read_rows, strings


@dataclass(frozen=True)
class GameItem:
    id: str
    prompt_a: str  # only A sees it
    prompt_b: str  # B's question
    answers: tuple[str, ...]  # gold answers (aliases); the first is the canonical one
    options: tuple[str, ...] = ()  # what B picks from, when the game names options
    accept: tuple[str, ...] = ()  # what answer-contained accuracy looks for, when not the answers


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


# The place split: EVAL_SHARE of the places (rounded), drawn once with a fixed seed, are evaluation
# places; the rest are train places (what in-task corpora draw from). No place is in both, so an
# aligner trained on train places and scored on `places: eval` is scored on places it never saw.
PLACE_SPLIT_SEED, EVAL_SHARE = "xmodel-places-v1", 0.3


def place_split(which: str = "all") -> tuple[tuple[str, str], ...]:
    """The (place, country) rows of one side of the place split (all: the whole table)."""
    if which not in PLACE_SPLITS:
        raise UserError(f"places = {which!r} is not one of {', '.join(PLACE_SPLITS)}")
    if which == "all":
        return PLACES
    shuffled = random.Random(PLACE_SPLIT_SEED).sample(range(len(PLACES)), len(PLACES))
    held = set(shuffled[:round(EVAL_SHARE * len(PLACES))])
    return tuple(row for i, row in enumerate(PLACES) if (i in held) == (which == "eval"))


def countries_items(n: int, seed: int = 0, places: str = "all") -> list[GameItem]:
    """n distinct (person, place) items, drawn by seed from one side of the place split."""
    pairs = [(p, place) for p in PEOPLE for place in place_split(places)]
    chosen = random.Random(f"xmodel-countries-{seed}").sample(pairs, min(n, len(pairs)))
    items = []
    for i, (person, (place, country)) in enumerate(chosen):
        answers = (country, *COUNTRY_ALIASES.get(country, ()), *PLACE_ALIASES.get(place, ()))
        tag = "" if places == "all" else f"{places}-"
        items.append(GameItem(f"countries-{tag}{seed}-{i}", f"{person} is at {place}.",
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


# --- local files ------------------------------------------------------------------------------------

# The games' own field names and the layouts recognised without `evaluate.<game>.fields`: ours, and
# the KVComm project's published files (Countries: prompt_A, prompt_B, y (a sentence: "Uma is located
# in the United States.") with person, landmark, country; Tip Sheets: prompt_A, prompt_B, options,
# label with attitudes). KVComm's Countries answer is its sentence `y` (EM and F1 compare with it, as
# KVComm's F1 does); answer-contained accuracy looks for the `country` (what the paper's accuracy asks).
OWN = Layout("xmodel", {"prompt_a": "prompt_a", "prompt_b": "prompt_b", "answer": "answer", "options": "options",
                        "accept": "accept", "id": "id"}, frozenset({"options", "accept", "id"}))
LAYOUTS = (
    OWN,
    Layout("kvcomm-countries", {"prompt_a": "prompt_A", "prompt_b": "prompt_B", "answer": "y", "accept": "country",
                                "id": "id"}, frozenset({"accept", "id"}), ("person", "landmark")),
    Layout("kvcomm-tipsheets", {"prompt_a": "prompt_A", "prompt_b": "prompt_B", "answer": "label",
                                "options": "options", "id": "id"}, frozenset({"id"}), ("attitudes",)),
)


_ROW_NUMBER = re.compile(r"(\d+)$")  # a row's line (file:3) or number (file: row 3)


def read_games(path: Path, game: str = "countries", fields: dict | None = None) -> tuple[list[GameItem], Rows]:
    """Items of a local file (any of pipeline.tasks.rows.SUFFIXES) in a recognised layout or the one
    `fields` maps: prompt_a, prompt_b, answer (a string, a list of accepted strings, or where options
    exist an option's index), optionally options (at least two, the answer among them), accept
    (answers for answer-contained accuracy; default: answer) and id."""
    rows = read_rows(path, game, LAYOUTS, fields)
    items, seen = [], set()
    for where, row in rows.rows:
        for key in ("prompt_a", "prompt_b"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string")
        options = row.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
            raise UserError(f"{where}: 'options' must be a list of non-empty strings")
        answer = row.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and options:  # KVComm's label: an index
            if not 0 <= answer < len(options):
                raise UserError(f"{where}: answer {answer} is no index of the {len(options)} options")
            answer = options[answer]
        answers = strings(where, "answer", answer)
        distinct_keys(where, "answer", answers)
        accept = strings(where, "accept", row["accept"]) if "accept" in row else answers
        distinct_keys(where, "accepted answer", accept)
        if options:
            distinct_keys(where, "option", options)
            if len(options) < 2 or option_choice(answers[0], options) is None:
                raise UserError(f"{where}: 'options' must list at least two choices, the answer {answers[0]!r} "
                                "among them")
        item_id = str(row.get("id", f"{Path(path).stem}-{_ROW_NUMBER.search(where).group(1)}"))
        if item_id in seen:
            raise UserError(f"{where}: id {item_id!r} appears twice: ids must be unique")
        seen.add(item_id)
        items.append(GameItem(item_id, row["prompt_a"], row["prompt_b"], tuple(answers), tuple(options),
                              tuple(accept) if accept is not answers else ()))
    return items, rows


def read_games_jsonl(path: Path) -> list[GameItem]:
    """Items of a file in our own layout (kept for callers of the former .jsonl-only reader)."""
    return read_games(path)[0]


def load_game(game: str, source: str, n: int, seed: int = 0, fields: dict | None = None,
              places: str = "all") -> tuple[list[GameItem], dict[str, Any]]:
    """`n` items of `game` from its generator ("generate") or a seeded sample of a local file, and
    what the run's record says about them (generator and place split, or file and layout)."""
    if n < 1:
        raise UserError(f"n = {n} items: ask for at least 1")
    if source == "generate":
        if game == "countries":
            return countries_items(n, seed, places), {"source": "generate", "places": places,
                                                      "place_split": {"seed": PLACE_SPLIT_SEED, "eval_share": EVAL_SHARE}}
        return GENERATORS[game](n, seed), {"source": "generate"}
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{game} source {source!r}: expected 'generate' or an existing file "
                        "(.jsonl, .json, .parquet or .csv)")
    items, rows = read_games(path, game, fields)
    return seeded_sample(items, n, seed), {"source": str(path), **rows.record()}


# --- scoring and prompts -----------------------------------------------------------------------------

_LETTER_REPLY = re.compile(r"^\(?([A-Z])(?:\)|[.:,]|$)")  # "B", "B.", "B) Paris", "(B)": a letter reply


def option_choice(text: str, options: Sequence[str]) -> str | None:
    """The option that `text` names first (normalized words, whole-word match; on a tie at the same
    position the longer option), or None when it names none. Options that are letters ("A"-"D") are
    chosen by a reply that starts with the letter, alone or followed by ")", ".", ":" or "," (a
    letter is also an article, so it is never looked for inside a sentence)."""
    from pipeline.tasks.scoring import answer_key, clean_prediction, normalize_answer

    said = clean_prediction(text) or text.strip()
    keys = {answer_key(o): o for o in options}
    if all(len(k) == 1 for k in keys):  # letter options
        m = _LETTER_REPLY.match(said.strip())
        return keys.get(m.group(1).lower()) if m else None
    said = f" {normalize_answer(said)} "
    best: tuple[int, int, str] | None = None
    for key, opt in keys.items():
        at = said.find(f" {key} ")
        if at >= 0 and (best is None or (at, -len(opt)) < best[:2]):
            best = (at, -len(opt), opt)
    return best[2] if best else None


def game_prompts(name: str, items: Sequence[GameItem], source: dict[str, Any] | None = None) -> TaskPrompts:
    """A reads prompt_a; B reads prompt_b; the skyline reads both; NL shows B A's message."""
    from pipeline.tasks.scoring import clean_prediction

    has_options = all(it.options for it in items) and bool(items)

    def with_message(i, message):
        return f"Your partner, who knows something you do not, told you: {message.strip()}\n\n{items[i].prompt_b}"

    def score(i, text):
        from pipeline.tasks.scoring import contains, squad_scores

        it = items[i]
        em, f1 = squad_scores(text, it.answers)
        out = {"em": em, "f1": f1}
        if has_options:
            out["option"] = float(option_choice(text, it.options) == option_choice(it.answers[0], it.options))
        # a letter answer is an article once normalized: it is found by option choice, not in the text
        letters = has_options and all(len(o.strip(" ().:")) == 1 for o in it.options)
        out["contains"] = out["option"] if letters else contains(text, it.accept or it.answers)
        return out

    columns = ("option", "em", "f1", "contains") if has_options else ("em", "f1", "contains")
    return TaskPrompts(name, [it.id for it in items], [it.prompt_a for it in items], [it.prompt_b for it in items],
                       [f"{it.prompt_a}\n\n{it.prompt_b}" for it in items], with_message, score, columns[0],
                       tuple(c for c in columns if c != "f1"), "Answer:", ("\n",), [list(it.answers) for it in items],
                       columns=columns, setting="private", source=dict(source or {}), shown=clean_prediction)


def _builder(game: str):
    def build(cfg: GameConfig, n: int | None, exclude: frozenset[str]) -> TaskPrompts:
        record: dict[str, Any] = {}

        def load(k):
            items, info = load_game(game, cfg.source, k, cfg.seed, cfg.fields, getattr(cfg, "places", "all"))
            record.update(info)
            return items

        items = disjoint(load, n or cfg.n, exclude, lambda it: it.prompt_a)
        return game_prompts(game, items, record)
    return build


COUNTRIES = Task("countries", CountriesConfig, _builder("countries"),
                 "private-information game: A knows where a person is, B is asked which country")
TIPSHEETS = Task("tipsheets", GameConfig, _builder("tipsheets"),
                 "private-information game: A holds tips on three companies, B picks one to invest in")
