"""Build the built-in image tasks from files inside registry wheels. Run once at development time:

    pip download --no-deps easy-vqa==1.0 scikit-image==0.26.0 matplotlib==3.11.2 scikit-learn==1.9.1 -d /tmp/w
    python evals/data/build_images.py /tmp/w

Only Pillow is needed (the wheels are read as zip files, never installed). Writes beside this file:
- `easy-vqa.{calib,test}.jsonl` and `easy-vqa/*.png`: yes/no existence questions about one coloured shape
  per 64x64 image (easy-VQA's test set, MIT), the affirmative phrasings only ("is there a red shape?",
  not "is there not a red shape?"), at most two "yes" and two "no" per image and as many of each;
  split by image, 30% calib;
- `pope-photos.test.jsonl` and `pope-photos/*.jpg`: hand-written POPE-style questions (`QUESTIONS`)
  about ten real photos bundled by scikit-image, matplotlib and scikit-learn, downscaled to 256 px.

Both are in POPE's question format: {"question_id", "image", "text", "label"}.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
import zipfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
CALIB_FRACTION = 0.3
EASY_VQA_IMAGES = 150
PHOTO_SIZE = 256

# (wheel name prefix, path inside the wheel, saved as) -> questions: (object phrase, present?)
PHOTOS = {
    ("scikit_image", "skimage/data/astronaut.png", "astronaut.jpg"): [
        ("person", True), ("flag", True), ("helmet", True), ("dog", False), ("car", False), ("cup", False),
    ],
    ("scikit_image", "skimage/data/chelsea.png", "chelsea.jpg"): [
        ("cat", True), ("animal", True), ("dog", False), ("person", False),
    ],
    ("scikit_image", "skimage/data/coffee.png", "coffee.jpg"): [
        ("cup", True), ("spoon", True), ("saucer", True), ("fork", False), ("knife", False), ("bottle", False),
    ],
    ("scikit_image", "skimage/data/rocket.jpg", "rocket.jpg"): [
        ("rocket", True), ("tower", True), ("light", True), ("person", False), ("car", False), ("airplane", False),
    ],
    ("scikit_image", "skimage/data/camera.png", "camera.jpg"): [
        ("person", True), ("camera", True), ("tripod", True), ("dog", False), ("bicycle", False), ("umbrella", False),
    ],
    ("scikit_image", "skimage/data/coins.png", "coins.jpg"): [("coin", True), ("clock", False)],
    ("scikit_image", "skimage/data/motorcycle_left.png", "motorcycle.jpg"): [
        ("motorcycle", True), ("bench", True), ("box", True), ("shelf", True),
        ("person", False), ("car", False), ("dog", False), ("cat", False),
    ],
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "grace_hopper.jpg"): [
        ("person", True), ("flag", True), ("hat", True), ("pair of glasses", True),
        ("cat", False), ("cup", False), ("book", False), ("umbrella", False),
    ],
    ("scikit_learn", "sklearn/datasets/images/china.jpg", "china.jpg"): [
        ("building", True), ("tree", True), ("lake", True), ("dog", False), ("airplane", False), ("bicycle", False),
    ],
    ("scikit_learn", "sklearn/datasets/images/flower.jpg", "flower.jpg"): [
        ("flower", True), ("plant", True), ("vase", False), ("bee", False),
    ],
}  # fmt: skip
AFFIRMATIVE = re.compile(r"^(is there a|does the image contain a|is a)\b")  # easy-VQA's non-negated forms


def wheel(folder: Path, prefix: str) -> zipfile.ZipFile:
    (path,) = folder.glob(f"{prefix}-*.whl")
    return zipfile.ZipFile(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def easy_vqa(folder: Path, rng: random.Random) -> None:
    archive = wheel(folder, "easy_vqa")
    questions = json.loads(archive.read("easy_vqa/data/test/questions.json"))
    by_image: dict[int, dict[str, list[str]]] = {}
    for text, answer, image in questions:
        texts = by_image.setdefault(image, {"yes": [], "no": []})
        if answer in texts and AFFIRMATIVE.match(text) and " not " not in text and text not in texts[answer]:
            texts[answer].append(text)
    usable = sorted(image for image, answers in by_image.items() if answers["yes"] and answers["no"])
    chosen = rng.sample(usable, EASY_VQA_IMAGES)
    out = HERE / "easy-vqa"
    out.mkdir(exist_ok=True)
    records = []
    for image in chosen:
        answers = by_image[image]
        per_label = min(2, len(answers["yes"]), len(answers["no"]))
        for label in ("yes", "no"):
            for text in rng.sample(answers[label], per_label):
                records.append({"image": f"{image}.png", "text": text[0].upper() + text[1:], "label": label})
        (out / f"{image}.png").write_bytes(archive.read(f"easy_vqa/data/test/images/{image}.png"))
    license_text = archive.read("easy_vqa-1.0.dist-info/LICENSE").decode()
    (out / "README.md").write_text(
        "# easy-VQA images\n\n"
        f"{EASY_VQA_IMAGES} of the 1000 test images of easy-VQA 1.0 (https://github.com/vzhou842/easy-VQA, "
        "PyPI `easy-vqa`), copied unchanged, with yes/no questions from its test set in "
        "`../easy-vqa.{calib,test}.jsonl` (built by `../build_images.py`). Licence:\n\n" + license_text
    )
    cut = round(len(chosen) * CALIB_FRACTION)
    calib_images = {f"{image}.png" for image in chosen[:cut]}
    for split, part in (
        ("calib", [r for r in records if r["image"] in calib_images]),
        ("test", [r for r in records if r["image"] not in calib_images]),
    ):
        write_jsonl(HERE / f"easy-vqa.{split}.jsonl", [{"question_id": i, **r} for i, r in enumerate(part)])
        yes = sum(r["label"] == "yes" for r in part)
        print(f"easy-vqa {split}: {len(part)} questions ({yes} yes)")


def pope_photos(folder: Path) -> None:
    out = HERE / "pope-photos"
    out.mkdir(exist_ok=True)
    records = []
    for (prefix, member, name), questions in PHOTOS.items():
        image = Image.open(io.BytesIO(wheel(folder, prefix).read(member)))
        image = image.convert("L" if image.mode in ("L", "I;16") else "RGB")
        image.thumbnail((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.LANCZOS)
        image.save(out / name, quality=90)
        for phrase, present in questions:
            article = "an" if phrase[0] in "aeiou" else "a"
            text = f"Is there {article} {phrase} in the image?"
            records.append(
                {"question_id": len(records), "image": name, "text": text, "label": "yes" if present else "no"}
            )
    write_jsonl(HERE / "pope-photos.test.jsonl", records)
    yes = sum(r["label"] == "yes" for r in records)
    print(f"pope-photos: {len(records)} questions ({yes} yes) on {len(PHOTOS)} photos")


def main(wheels: str) -> None:
    easy_vqa(Path(wheels), random.Random(0))
    pope_photos(Path(wheels))


if __name__ == "__main__":
    main(*sys.argv[1:])
