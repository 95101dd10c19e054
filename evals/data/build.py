"""Build the built-in tasks from real data that registry packages ship. Run once at development time:

    pip install babel==2.18.0                                  # CLDR facts
    pip download --no-deps lm_eval==0.4.13 -d /tmp/lm_eval     # MMLU dev questions inside its wheel
    python evals/data/build.py /tmp/lm_eval/lm_eval-0.4.13-py3-none-any.whl

Writes `<task>.calib.jsonl` and `<task>.test.jsonl` beside this file (30% / 70% of each task, seeded):
- `cldr_language`, `cldr_currency`: country -> official language / currency, 4-way multiple choice,
  distractors drawn from the other countries' answers (Unicode CLDR via Babel);
- `mmlu_dev`: the MMLU dev questions embedded in lm-eval's MMLU chain-of-thought prompts, as a
  zero-shot letter choice;
- `unanswerable_qa`: "what is the official language of X?" for real countries and for invented
  ones, answered by greedy generation: a real country needs its language, an invented one needs "I
  don't know"; answering anyway is a hallucination.
"""

from __future__ import annotations

import datetime
import json
import random
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).parent
CALIB_FRACTION = 0.3
NOT_COUNTRIES = {"EU", "EZ", "QO", "UN", "XA", "XB", "ZZ"}  # CLDR pseudo-territories
ABSTAIN_INSTRUCTION = 'Answer with the name of a language. If there is no such country, answer "I don\'t know".\n\n'


def countries() -> list[dict]:
    from babel import Locale
    from babel.languages import get_official_languages
    from babel.numbers import get_currency_name, get_territory_currencies

    english = Locale("en")
    facts = []
    for code, name in sorted(english.territories.items()):
        if len(code) != 2 or not code.isalpha() or code in NOT_COUNTRIES:
            continue
        languages = [english.languages.get(lang) for lang in get_official_languages(code)]
        currencies = get_territory_currencies(code, start_date=datetime.date(2025, 1, 1), tender=True)
        languages = [lang for lang in languages if lang]
        if languages and currencies:
            facts.append(
                {
                    "code": code,
                    "country": name,
                    "languages": languages,
                    "currency": get_currency_name(currencies[0], locale="en"),
                }
            )
    return facts


def multiple_choice(facts, rng, question: str, answer_of, accepted_of) -> list[dict]:
    pool = sorted({answer_of(f) for f in facts})
    items = []
    for fact in facts:
        gold = answer_of(fact)
        wrong = [a for a in pool if a not in accepted_of(fact)]
        choices = [gold, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        query = f"Question: {question.format(country=fact['country'])}\nAnswer:"
        items.append({"query": query, "choices": choices, "gold": choices.index(gold), "country": fact["country"]})
    return items


def invented_countries(rng, real: set[str], count: int) -> list[str]:
    starts = ["Bel", "Cor", "Dra", "Esk", "Fal", "Gor", "Hal", "Istr", "Kar", "Lun", "Mar", "Nov", "Ost", "Pel"]
    middles = ["a", "e", "o", "i", "ava", "ero", "ista", "ondo", "uma", "ele"]
    ends = ["via", "nia", "land", "stan", "ria", "dor", "mark", "gard", "nesia", "ovia"]
    names: set[str] = set()
    while len(names) < count:
        name = rng.choice(starts) + rng.choice(middles) + rng.choice(ends)
        if not any(name.lower() in r.lower() or r.lower() in name.lower() for r in real):
            names.add(name)
    return sorted(names)


def unanswerable_qa(facts, rng, count: int = 120) -> list[dict]:
    question = "Question: What is the official language of {country}?\nAnswer:"
    real = rng.sample(facts, count)
    items = [
        {"query": ABSTAIN_INSTRUCTION + question.format(country=f["country"]), "answers": f["languages"]} for f in real
    ]
    for name in invented_countries(rng, {f["country"] for f in facts}, count):
        items.append({"query": ABSTAIN_INSTRUCTION + question.format(country=name), "answers": []})
    return items


MMLU_ITEM = re.compile(
    r"Q: (?P<question>.+?)\n\(A\) (?P<A>.+?) \(B\) (?P<B>.+?) \(C\) (?P<C>.+?) \(D\) (?P<D>.+?)\n"
    r"A: .*?The answer is \((?P<answer>[ABCD])\)",
    re.DOTALL,
)


def mmlu_dev(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as archive:
        prompts = json.loads(archive.read("lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"))
    items = []
    for subject, text in sorted(prompts.items()):
        for block in text.split("\n\nQ: "):
            match = MMLU_ITEM.search(block if block.startswith("Q: ") else "Q: " + block)
            if not match or re.search(r"[\x00-\x09\x0b-\x1f]", match.group(0)):
                continue  # the JSON's LaTeX lost its backslashes to escapes such as \f: skip those items
            options = "".join(f"\n{letter}. {match.group(letter).strip()}" for letter in "ABCD")
            topic = subject.replace("_", " ")
            query = (
                f"The following is a multiple choice question about {topic}.\n\n"
                f"{match.group('question').strip()}{options}\nAnswer:"
            )
            items.append({"query": query, "choices": list("ABCD"), "gold": "ABCD".index(match.group("answer"))})
    return items


def write_splits(name: str, items: list[dict], rng) -> None:
    items = list(items)
    rng.shuffle(items)
    cut = round(len(items) * CALIB_FRACTION)
    for split, part in (("calib", items[:cut]), ("test", items[cut:])):
        with open(HERE / f"{name}.{split}.jsonl", "w") as f:
            for item in part:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{name}: {cut} calib, {len(items) - cut} test")


def main(lm_eval_wheel: str) -> None:
    facts = countries()
    rng = random.Random(0)
    write_splits(
        "cldr_language",
        multiple_choice(
            facts,
            rng,
            "What is the official language of {country}?",
            lambda f: f["languages"][0],
            lambda f: f["languages"],
        ),
        rng,
    )
    write_splits(
        "cldr_currency",
        multiple_choice(
            facts, rng, "What is the currency of {country}?", lambda f: f["currency"], lambda f: {f["currency"]}
        ),
        rng,
    )
    write_splits("mmlu_dev", mmlu_dev(Path(lm_eval_wheel)), rng)
    write_splits("unanswerable_qa", unanswerable_qa(facts, rng), rng)


if __name__ == "__main__":
    main(*sys.argv[1:])
