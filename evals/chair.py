"""CHAIR (Rohrbach et al., 2018): which COCO objects a caption mentions, and which of them are not in the image.

A caption is lower-cased and cut into words (runs of letters); plurals become singular by a small set of
rules, and a plural of a synonym's word that the rules miss (taxis, tvs) becomes that word; then, left to
right, the longest run of words that is a synonym of one of the 80 COCO categories is a mention of that
category ("hot dog" is a hot dog, not a dog). As in the reference evaluator, an animal word after
"baby"/"adult" and a vehicle after "passenger" is not also a person, and "seat" is not a chair when the
caption mentions a toilet. No NLTK, no downloads: the rules below are the whole tokenizer.

The ground-truth objects of an image are its COCO instance categories plus every object its reference
captions mention, read from the public `instances_*.json` and `captions_*.json` files.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

SYNONYMS = Path(__file__).parent / "data" / "coco_synonyms.txt"
QUALIFIERS = {  # a qualifier word that must not count as a person before these categories
    "baby": {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"},
    "adult": {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"},
    "passenger": {"airplane", "train", "bus", "boat", "car"},
}
IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose", "oxen": "ox",
    "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf", "shelves": "shelf", "calves": "calf",
    "wolves": "wolf", "loaves": "loaf", "buses": "bus", "busses": "bus", "ties": "tie", "skis": "ski",
    "scissors": "scissors", "species": "species", "series": "series",
}  # fmt: skip


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def singular(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("men") and len(word) > 4:
        return word[:-3] + "man"  # policemen, gentlemen
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"  # puppies, ponies
    if word.endswith("es") and word[:-2].endswith(("ss", "sh", "ch", "x", "zz")):
        return word[:-2]  # glasses, toothbrushes, sandwiches, boxes
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]  # dogs, horses, oranges (but not bus, glass, tennis, has)
    return word


@dataclass(frozen=True)
class Vocabulary:
    """The COCO categories and their synonyms, each synonym as a tuple of singular words."""

    phrases: dict[tuple[str, ...], str]  # synonym words -> category
    longest: int
    known: frozenset[str]  # every word of the synonyms

    def singular(self, word: str) -> str:
        """`singular(word)`, or the synonym word that `word` is a plural of where the rules, made to leave
        words such as "tennis", "bus" and "has" alone, miss it: taxis, tvs, neckties, minibuses."""
        rule = singular(word)
        stems = [word[:-1]] if word.endswith("s") else []
        if word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
            stems.append(word[:-2])  # minibuses (but "cares" is not cars)
        return next((stem for stem in (rule, *stems) if stem in self.known), rule)

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """(the synonym's words, the category) for each object mention, in order."""
        tokens = [self.singular(w) for w in words(caption)]
        found: list[tuple[str, str]] = []
        i = 0
        while i < len(tokens):
            for size in range(min(self.longest, len(tokens) - i), 0, -1):
                category = self.phrases.get(tuple(tokens[i : i + size]))
                if category is not None:
                    found.append((" ".join(tokens[i : i + size]), category))
                    i += size
                    break
            else:
                i += 1
        kept = []
        for index, (word, category) in enumerate(found):
            following = found[index + 1][1] if index + 1 < len(found) else None
            if word in QUALIFIERS and following in QUALIFIERS[word]:
                continue  # "baby elephant" is an elephant, not a person
            kept.append((word, category))
        if any(category == "toilet" for _, category in kept):
            kept = [(word, category) for word, category in kept if word != "seat"]
        return kept

    def category(self, name: str) -> str | None:
        return self.phrases.get(tuple(self.singular(w) for w in words(name)))


@functools.cache
def vocabulary(path: str | Path = SYNONYMS) -> Vocabulary:
    """Read a synonyms file: one category a line, its COCO name first, then its synonyms, comma-separated
    (the layout of the CHAIR reference's `synonyms.txt`, which can be given instead of the bundled list)."""
    phrases: dict[tuple[str, ...], str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        names = [name.strip() for name in line.split(",") if name.strip()]
        if not names:
            continue
        for name in names:
            key = tuple(singular(w) for w in words(name))
            if not key:
                raise ValueError(f"{path}:{number}: synonym {name!r} has no letters")
            phrases.setdefault(key, names[0])  # a synonym listed twice keeps its first category
    known = frozenset(word for phrase in phrases for word in phrase)
    return Vocabulary(phrases=phrases, longest=max(map(len, phrases)), known=known)


def score(caption: str, objects: set[str], vocab: Vocabulary) -> dict:
    """Per-caption CHAIR counts; their sums over a set of captions give CHAIR_S, CHAIR_I, recall and length."""
    mentions = vocab.mentions(caption)
    hallucinated = [category for _, category in mentions if category not in objects]
    covered = {category for _, category in mentions} & objects
    return {
        "mentions": [list(m) for m in mentions],
        "hallucinated_objects": hallucinated,
        "chair_s": float(bool(hallucinated)),
        "n_hallucinated": float(len(hallucinated)),
        "n_mentioned": float(len(mentions)),
        "n_covered": float(len(covered)),
        "n_objects": float(len(objects)),
        "length": float(len(words(caption))),
    }


@functools.cache
def ground_truth(instances: str, captions: str, synonyms: str) -> dict[int, frozenset[str]]:
    """Image id -> the COCO categories present: instance annotations plus objects the reference captions name.

    Every image listed in either file gets an entry (possibly empty). Errors name the file and the fix."""
    vocab = vocabulary(synonyms)
    truth: dict[int, set[str]] = {}
    segments = _load(instances, "annotations", "categories")
    names = {}
    for category in segments["categories"]:
        names[category["id"]] = vocab.category(category["name"])
        if names[category["id"]] is None:
            raise ValueError(
                f"{instances}: category {category['name']!r} is not in the synonyms list {synonyms}; "
                "give a synonyms file whose lines start with the COCO category names"
            )
    for image in segments.get("images", []):
        truth.setdefault(image["id"], set())
    for annotation in segments["annotations"]:
        truth.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    references = _load(captions, "annotations")
    for image in references.get("images", []):
        truth.setdefault(image["id"], set())
    for annotation in references["annotations"]:
        found = {category for _, category in vocab.mentions(annotation["caption"])}
        truth.setdefault(annotation["image_id"], set()).update(found)
    return {image: frozenset(objects) for image, objects in truth.items()}


def _load(path: str, *keys: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as error:
        raise ValueError(f"COCO annotation file {path} cannot be read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"COCO annotation file {path} is not valid JSON ({error.msg} at line {error.lineno})"
        ) from None
    missing = [key for key in keys if not isinstance(document, dict) or key not in document]
    if missing:
        raise ValueError(f"{path} is not a COCO annotation file: it has no {missing[0]!r} list")
    return document
