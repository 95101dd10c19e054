"""Write the head lists published with the official ACT code as intervene configs.

    python configs/published/build.py

The lists are GATECH-EIC/ACT `models/augment_index.py` at commit a267af7: entry i of a list holds
the query heads that the authors' offline calibration kept in layer 2 + i. They were calibrated for
those exact models, with beta 0.4 and threshold 0.1, on classification (9 datasets) or multiple-choice
(7 datasets) prompts; replay one with `intervene eval --model <hub id> --config <file>`.

A config keeps only the layers that the official code calibrates for its model, `OFFICIAL_LAYERS`: the
Llama path (`models/llama_modelling_aug.py`) edits `signal in range(2, 31)`, layers 2..L-2 of the
32-layer Llama-2-7B, and its calibration sweep (`scripts/calibration.sh`) covers the same 2..30; the
Mistral path (`models/mistral_modelling_aug.py`) edits `signal in range(2, 32)`, layers 2..L-1. An entry
for a layer outside that range is dropped, since the official code never applies it: `indices_comb_MC`
lists heads [4, 31] for layer 31 of Llama-2-7b-chat, which its range leaves out.
"""

from __future__ import annotations

import json
from pathlib import Path

import intervene
from intervene.interventions.act import ACT

LLAMA_2_7B_CHAT = {"name_or_path": "meta-llama/Llama-2-7b-chat-hf", "num_layers": 32, "num_heads": 32}
MISTRAL_7B_INSTRUCT = {"name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "num_layers": 32, "num_heads": 32}

# The layers the official code calibrates, for a model of L layers (see the module docstring).
OFFICIAL_LAYERS = {
    LLAMA_2_7B_CHAT["name_or_path"]: lambda num_layers: range(2, num_layers - 1),  # range(2, 31) for L = 32
    MISTRAL_7B_INSTRUCT["name_or_path"]: lambda num_layers: range(2, num_layers),  # range(2, 32) for L = 32
}

LISTS = {
    ("llama-2-7b-chat", "act-classification", "aug_indices_comb_classification"): (LLAMA_2_7B_CHAT, [
        [2, 8, 12, 13, 16, 17, 20, 25], [0, 1, 2, 10, 24, 28], [1, 3, 4, 9, 10, 11, 15, 19, 23, 25, 27, 30],
        [0, 1, 3, 8, 9, 12, 13, 14, 19, 22], [1, 11, 13, 15, 17, 18, 20, 21, 22, 25, 28, 31], [7, 8, 18, 24, 25],
        [0, 2, 5, 6, 7, 8, 26], [0, 6, 7, 10, 11, 15, 17, 20, 21, 29], [1, 4, 19, 22, 23, 25, 26, 27, 31],
        [6, 8, 10, 12, 14, 15, 17, 18, 21, 26, 27, 28], [0, 4, 6, 11, 21, 24, 25, 27], [1, 4, 9, 21, 25, 26, 27],
        [0, 1, 4, 7, 9, 12, 13, 15, 19, 21, 24], [6, 9, 12, 17, 19, 21, 24, 25, 26], [0, 29],
        [0, 15, 19, 24, 29, 30], [7, 12, 22, 23], [2, 15, 16, 21, 30], [1, 2, 5, 9, 10, 15, 20, 27, 29],
        [17, 20, 24, 29], [2, 3, 5, 6, 13, 15, 25], [5, 6, 16], [1, 3, 5, 13, 20], [17, 24], [9, 14, 19, 20],
        [2, 29], [], [2, 14, 15, 25], [2],
    ]),
    ("llama-2-7b-chat", "act-multiple-choice", "indices_comb_MC"): (LLAMA_2_7B_CHAT, [
        [8, 13, 17, 20], [1], [23, 27, 30], [0, 1, 9, 10, 13, 17, 27], [1, 11, 22, 31], [], [2, 6],
        [0, 7, 10, 15, 20], [19, 22, 23, 25, 26], [8, 10, 12, 14, 15, 17, 18, 26], [0, 6, 31], [8, 9, 21, 26],
        [0, 13, 15], [12, 21, 24], [31], [24, 30], [7, 17], [30], [15, 29], [20], [2, 6], [], [18, 20], [],
        [6, 14, 19], [29], [13], [2, 15], [], [4, 31],
    ]),
    ("mistral-7b-instruct-v0.2", "act-classification", "aug_classification_mistral"): (MISTRAL_7B_INSTRUCT, [
        [5, 10], [23], [], [3], [8, 13], [], [], [16, 24], [14], [31], [9], [0, 13, 27], [0, 9],
        *[[]] * 17,
    ]),
    ("mistral-7b-instruct-v0.2", "act-multiple-choice", "aug_MC_mistral"): (MISTRAL_7B_INSTRUCT, [
        [19], [22], [3, 7, 12, 15, 31], [0, 29], [31], [5, 13, 21, 23, 24, 27], [0, 7, 17, 20, 25, 27, 29],
        [7, 19, 23, 29], [24, 26, 28, 31], [5, 11, 23, 27], [9, 12, 13, 14], [4, 22, 26, 30],
        [14, 16, 20, 22, 23, 25], [4, 8, 13, 22], [15, 23, 26, 28], [7, 10, 22], [6, 28, 31], [3, 14, 21],
        [1, 7, 21], [9], [13, 23], [2], [8, 9, 19, 28, 30], [4, 6, 17, 22, 28], [22], [2, 9, 14, 22],
        [2, 4, 5, 7, 10, 13, 20], [6, 28, 29], [], [0, 1, 11, 14, 21, 30],
    ]),
}  # fmt: skip


def main() -> None:
    for (model, name, source), (identity, lists) in LISTS.items():
        official = OFFICIAL_LAYERS[identity["name_or_path"]](identity["num_layers"])
        dropped = [2 + i for i, hs in enumerate(lists) if hs and 2 + i not in official]
        lists = [hs if 2 + i in official else [] for i, hs in enumerate(lists)]
        config = ACT.from_official(lists, beta=0.4, threshold=0.1)
        note = f"; layers {dropped} dropped, outside the official range({official.start}, {official.stop})"
        document = {
            "schema": 1,
            "method": "act",
            "params": config.to_dict(),
            "model": identity,
            "intervene_version": intervene.__version__,
            "source": f"GATECH-EIC/ACT@a267af7 models/augment_index.py {source}" + (note if dropped else ""),
        }
        path = Path(__file__).parent / model / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
        kept = f"{sum(map(len, lists))} heads in {sum(1 for hs in lists if hs)} layers"
        print(f"{path}: {kept}{note if dropped else ''}")


if __name__ == "__main__":
    main()
