"""A synthetic chest X-ray + report world in the real MIMIC-CXR-JPG layout: the project's default data (decision D13).

MIMIC-CXR needs credentials, so this file generates stand-in data: procedural frontal radiograph phantoms whose
findings (side, zone, size, severity) are described by MIMIC-style reports, written exactly as the real files are laid
out (docs/datasets.md §1; the test split's grounding boxes in the MS-CXR format of §6). The words for a
finding correlate with what is in the image: that is what a contrastive model has to learn.

    python -m world.synthetic --out data/synthetic --studies 6000 --seed 0

Besides the official files (images, reports, metadata / split / chexpert CSVs) it writes
`MS_CXR_Local_Alignment_v1.0.0.csv` (test split, one row per finding phrase and box, in pixels of the written image)
and `synthetic-labels.csv` (the true 0/1 finding per name in FINDINGS, for zero-shot evaluation: nodule and mass share
CheXpert's "Lung Lesion" column) and `train-rle.csv` (every image's pneumothorax mask, all splits, in the Kaggle
SIIM-ACR format of docs/datasets.md §4.3: ImageId = dicom_id, for segment.py). For detection (detect.py) it writes
`synthetic-boxes.csv` (every finding's boxes in every split) and an RSNA-style `stage_2_train_labels.csv` for
consolidation, the world's "pneumonia". As on a real frontal film, the patient's right is on the image left.
"""
import csv
import ctypes
import gzip
import io
import multiprocessing
import os
import re
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data import MS_CXR_HEADER, split_sentences
from util.cli import check_options, option, run_script
from util.eval_datasets import rle_encode
from world.phantom import FINDINGS, render_image

FINDING_TO_CHEXPERT = {"cardiomegaly": "Cardiomegaly", "pleural effusion": "Pleural Effusion",
                       "pneumothorax": "Pneumothorax", "consolidation": "Consolidation", "nodule": "Lung Lesion",
                       "mass": "Lung Lesion", "edema": "Edema", "atelectasis": "Atelectasis"}
CHEXPERT_COLUMNS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                    "Pneumothorax", "Support Devices"]
METADATA_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
SPLIT_HEADER = ["dicom_id", "study_id", "subject_id", "split"]
NORMAL_FRACTION = 0.35
# P(finding | abnormal study): each finding ends up in roughly 8-20% of all studies.
ABNORMAL_PROBABILITY = {"cardiomegaly": 0.2, "pleural effusion": 0.23, "pneumothorax": 0.16, "consolidation": 0.24,
                        "nodule": 0.16, "mass": 0.12, "edema": 0.16, "atelectasis": 0.22}


@dataclass
class Finding:
    name: str                # one of FINDINGS
    side: str = ""           # the patient's "right" | "left" | "bilateral" | ""
    zone: str = ""           # "upper" | "middle" | "lower" | ""
    severity: int = 0        # 0 (mild / small) .. 2 (severe / large)
    size_cm: float = 0.0     # nodule and mass diameter
    uncertain: bool = False  # the report hedges ("possible ..."): CheXpert -1.0


@dataclass
class Study:
    subject_id: int
    study_id: int
    dicom_id: str
    split: str
    view: str                # "PA" | "AP"
    seed: int                # seeds every random choice of the image
    findings: list = field(default_factory=list)
    devices: list = field(default_factory=list)

    @property
    def image_path(self) -> str:
        """The MIMIC-CXR-JPG path formula files/p{sid[:2]}/p{sid}/s{study}/{dicom}.jpg (docs/datasets.md §1.1)."""
        return f"{self.report_path[:-4]}/{self.dicom_id}.jpg"

    @property
    def report_path(self) -> str:
        """One report per study, a sibling of the study folder: files/p{sid[:2]}/p{sid}/s{study}.txt."""
        sid = str(self.subject_id)
        return f"files/p{sid[:2]}/p{sid}/s{self.study_id}.txt"



# ---------------------------------------------------------------------------------------------------------------
# Studies and reports. Sentences are built so that the labeler below reads them as intended: a sentence naming
# an absent finding always carries a negation cue, a hedged one an uncertainty cue in the same clause.

SEVERITY_WORDS = {"cardiomegaly": ["mild", "moderate", "severe"], "edema": ["mild", "moderate", "severe"],
                  "pleural effusion": ["small", "moderate", "large"], "pneumothorax": ["small", "moderate", "large"],
                  "consolidation": ["subtle", "patchy", "dense"], "atelectasis": ["minimal", "mild", "moderate"]}
LOBES = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe", ("left", "middle"): "lingula",
         ("left", "lower"): "left lower lobe"}
POSITIVE = {  # present findings; the "/bilateral" variants for bilateral ones
    "cardiomegaly": ["The heart is {adv} enlarged.", "{sev} cardiomegaly.", "Heart size is {adv} enlarged.",
                     "There is {sev} enlargement of the cardiac silhouette."],
    "pleural effusion": ["{sev} {side} pleural effusion.", "There is a {sev} {side} pleural effusion.",
                         "{sev} {side}-sided pleural effusion.",
                         "A {sev} {side} pleural effusion is present, with blunting of the costophrenic angle."],
    "pleural effusion/bilateral": ["{sev} bilateral pleural effusions.", "There are {sev} bilateral pleural effusions.",
                                   "{sev} pleural effusions are present bilaterally."],
    "pneumothorax": ["{sev} {side} pneumothorax.", "There is a {sev} {side} pneumothorax with a visible pleural line.",
                     "A {sev} pneumothorax is seen on the {side}.", "{sev} {side}-sided pneumothorax."],
    "consolidation": ["{sev} consolidation in the {lobe}, concerning for pneumonia.",
                      "There is {sev} consolidation in the {lobe}.",
                      "{sev} opacity in the {lobe}, consistent with consolidation.",
                      "{sev} {lobe} consolidation consistent with pneumonia."],
    "nodule": ["A {size} nodule in the {zone}.", "There is a {size} nodule projecting over the {zone}.",
               "{size} nodular opacity in the {zone}.", "A {size} pulmonary nodule is seen in the {zone}."],
    "mass": ["A {size} mass in the {lobe}.", "There is a {size} mass in the {lobe}, concerning for malignancy.",
             "{size} mass projecting over the {zone}.", "A {size} rounded mass is seen in the {lobe}."],
    "edema": ["{sev} pulmonary edema.", "There is {sev} pulmonary edema with perihilar haziness.",
              "Findings are consistent with {sev} pulmonary edema.",
              "{sev} interstitial edema with bilateral perihilar haziness."],
    "atelectasis": ["{sev} plate-like atelectasis at the {side} lung base.", "{sev} {side} basilar atelectasis.",
                    "Linear opacity at the {side} base, likely atelectasis.",
                    "There is {sev} discoid atelectasis in the {side} lower lung."],
    "atelectasis/bilateral": ["{sev} bibasilar atelectasis.", "{sev} plate-like atelectasis at both lung bases.",
                              "There is {sev} bibasilar atelectasis."],
}
UNCERTAIN = {  # hedged mentions of present, mild findings
    "cardiomegaly": ["The heart size is borderline enlarged.", "Possible mild cardiomegaly."],
    "pleural effusion": ["Possible small {side} pleural effusion.",
                         "Blunting of the {side} costophrenic angle, possibly a small pleural effusion."],
    "pleural effusion/bilateral": ["Possible small bilateral pleural effusions.",
                                   "Blunting of both costophrenic angles, possibly small pleural effusions."],
    "pneumothorax": ["Possible small {side} apical pneumothorax.",
                     "A small {side} apical pneumothorax cannot be excluded."],
    "consolidation": ["Subtle opacity in the {lobe} may represent early consolidation.",
                      "Possible early consolidation in the {lobe}."],
    "nodule": ["Possible {size} nodule in the {zone}, recommend chest CT for further evaluation.",
               "A {size} nodular density in the {zone} could represent a nodule."],
    "edema": ["Mild perihilar haziness may reflect mild pulmonary edema.", "Possible mild pulmonary edema."],
    "atelectasis": ["Minimal linear opacity at the {side} base may reflect atelectasis.",
                    "Possible minimal {side} basilar atelectasis."],
    "atelectasis/bilateral": ["Possible minimal bibasilar atelectasis."],
}
NEGATIONS = [  # (absent findings, probability, sentences)
    ({"pleural effusion", "pneumothorax"}, 0.8, ["No pleural effusion or pneumothorax.",
                                                 "There is no pleural effusion or pneumothorax.",
                                                 "No pneumothorax or pleural effusion is seen."]),
    ({"pleural effusion"}, 0.6, ["No pleural effusion.", "There is no pleural effusion."]),
    ({"pneumothorax"}, 0.6, ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."]),
    ({"consolidation"}, 0.6, ["No focal consolidation.", "No focal consolidation is seen.",
                              "There is no focal consolidation to suggest pneumonia."]),
    ({"edema"}, 0.4, ["No pulmonary edema.", "There is no pulmonary edema.", "No evidence of pulmonary edema."]),
    ({"cardiomegaly"}, 0.7, ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly.",
                             "The cardiac silhouette is within normal limits."]),
    ({"nodule", "mass"}, 0.3, ["No suspicious pulmonary nodules or masses.",
                               "No pulmonary nodules or masses are seen."]),
    ({"atelectasis"}, 0.1, ["No atelectasis."]),
]
DEVICE_SENTENCES = {
    "endotracheal tube": ["Endotracheal tube terminates approximately 4 cm above the carina.",
                          "An endotracheal tube is in standard position."],
    "enteric tube": ["An enteric tube courses below the diaphragm with the tip in the stomach.",
                     "Nasogastric tube tip is in the stomach."],
    "central venous catheter": ["Right internal jugular central venous catheter terminates in the mid SVC.",
                                "A right IJ catheter ends in the SVC."],
    "pacemaker": ["Left-sided pacemaker with leads in the right atrium and right ventricle.",
                  "A left chest wall pacemaker is present with leads terminating in the right ventricle."],
}
INDICATIONS = ["___M with cough and fever  // eval for pneumonia", "___F with shortness of breath",
               "___-year-old man with chest pain  // r/o acute process", "___-year-old woman with dyspnea",
               "History: ___F with hypoxia", "___M with weakness  // eval for acute cardiopulmonary process"]


def sample_study(seed: int, index: int, subject_id: int, study_id: int, dicom_id: str, split: str) -> Study:
    """Draw the content of study `index` from (seed, index) alone, so that it does not depend on the workers."""
    rng = np.random.default_rng([seed, 1, index])
    choice = lambda options, p=None: options[rng.choice(len(options), p=p)]  # noqa: E731
    view, names = ("AP" if rng.random() < 0.3 else "PA"), []
    if rng.random() >= NORMAL_FRACTION:
        names = [name for name in FINDINGS if rng.random() < ABNORMAL_PROBABILITY[name]]
        if "edema" in names:  # congestive failure: edema often comes with a large heart and effusions
            names += [name for name in ("cardiomegaly", "pleural effusion") if rng.random() < 0.4]
        if not names:
            weights = np.array(list(ABNORMAL_PROBABILITY.values()))
            names = [choice(list(ABNORMAL_PROBABILITY), weights / weights.sum())]
    findings = []
    for name in (n for n in FINDINGS if n in names):
        finding = Finding(name, severity=int(rng.choice(3, p=[0.4, 0.35, 0.25])))
        if name in ("pleural effusion", "atelectasis"):
            finding.side = choice(["right", "left", "bilateral"], [0.35, 0.3, 0.35])
        elif name in ("pneumothorax", "consolidation", "nodule", "mass"):
            finding.side = choice(["right", "left"])
        finding.side = "bilateral" if name == "edema" else finding.side
        if name in ("consolidation", "nodule", "mass"):
            finding.zone = choice(["upper", "middle", "lower"])
        if name in ("nodule", "mass"):
            finding.size_cm = round(rng.uniform(0.7, 2.0) if name == "nodule" else rng.uniform(3.0, 6.0), 1)
            finding.severity = 0
        finding.uncertain = (name in UNCERTAIN and rng.random() < 0.3
                             and (finding.size_cm < 1.2 if name == "nodule" else finding.severity == 0))
        findings.append(finding)
    by_name = {f.name: f for f in findings}
    effusion, atelectasis = by_name.get("pleural effusion"), by_name.get("atelectasis")
    if effusion and atelectasis and effusion.severity > 0:  # keep the plate visible, out of the fluid
        if effusion.side == "bilateral":
            findings.remove(atelectasis)
        else:
            atelectasis.side = "left" if effusion.side == "right" else "right"
    devices = []
    if rng.random() < (0.35 if view == "AP" else 0.05):
        devices = sorted(rng.choice(list(DEVICE_SENTENCES), size=rng.integers(1, 4), replace=False).tolist())
    return Study(subject_id, study_id, dicom_id, split, view, int(rng.integers(2 ** 62)), findings, devices)


def _finding_sentence(finding: Finding, rng) -> str:
    """One paraphrase naming the side, zone and severity (or size) of a present finding."""
    key = finding.name + ("/bilateral" if finding.side == "bilateral" and finding.name != "edema" else "")
    templates = (UNCERTAIN if finding.uncertain else POSITIVE)[key]
    size = f"{round(finding.size_cm * 10)} mm" if finding.size_cm < 1 else f"{finding.size_cm:.1f} cm"
    zone = f"{finding.side} {dict(upper='upper', middle='mid', lower='lower').get(finding.zone)} lung"
    sentence = templates[rng.integers(len(templates))].format(
        sev=SEVERITY_WORDS.get(finding.name, [""])[finding.severity], side=finding.side, size=size, zone=zone,
        adv=["mildly", "moderately", "markedly"][finding.severity], lobe=LOBES.get((finding.side, finding.zone)))
    sentence = re.sub(r"\b([Aa]) (8|11|18)\b", r"\1n \2", sentence)  # "an 8 mm nodule"
    return sentence[0].upper() + sentence[1:]


def write_report(study: Study, rng) -> tuple[str, list[str]]:
    """The MIMIC-style report (docs/datasets.md §1.6) and, per finding, the FINDINGS-section phrase that describes it."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    present = {f.name for f in study.findings}
    phrases = [_finding_sentence(f, rng) for f in study.findings]
    sentences = phrases + [pick(DEVICE_SENTENCES[d]) for d in study.devices]
    negated = set()
    for names, probability, options in NEGATIONS:
        if not names & (present | negated) and rng.random() < probability:
            sentences.append(pick(options))
            negated |= names
    if rng.random() < 0.7:
        sentences.append(pick(["The mediastinal and hilar contours are unremarkable.",
                               "Mediastinal and hilar contours are normal."]))
    if not present - {"cardiomegaly", "pleural effusion"} and rng.random() < 0.7:
        sentences.append(pick(["The lungs are clear.", "The lungs are well expanded and clear.",
                               "Lungs are clear bilaterally."]))
    if rng.random() < 0.5:
        sentences.append(pick(["No acute osseous abnormality.", "The osseous structures are intact.",
                               "Visualized osseous structures are unremarkable.", "No acute fracture is seen."]))
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]  # varied sentence order
    impressions = [_finding_sentence(f, rng) for f in study.findings]
    if not impressions:
        impressions = ["Support devices in standard position."] if study.devices else []
        impressions.append(pick(["No acute cardiopulmonary process.", "No acute intrathoracic process.",
                                 "Normal chest radiograph."]))
    if len(impressions) > 1 and rng.random() < 0.5:  # a numbered list, one item per line
        impression = "\n".join(_wrap(f"{i + 1}. {s}") for i, s in enumerate(impressions))
    else:
        impression = _wrap("  ".join(impressions))
    exam, technique = {"PA": ("CHEST (PA AND LAT)", "Chest PA and lateral"),
                       "AP": ("CHEST (PORTABLE AP)", "Portable AP upright view of the chest")}[study.view]
    lines = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {exam}", " ", f" INDICATION:  {pick(INDICATIONS)}", " ",
             f" TECHNIQUE:  {technique}", " ", f" COMPARISON:  {pick(['None.', '___.', 'Chest radiograph from ___.'])}",
             " ", " FINDINGS: ", " ", _wrap("  ".join(sentences)), " ", " IMPRESSION: ", " ", impression]
    return "\n".join(lines) + "\n", [p.rstrip(".") for p in phrases]


def _wrap(text: str) -> str:
    return "\n".join(" " + line for line in textwrap.wrap(text, 77))


# A small rule-based labeler in the spirit of the CheXpert labeler, applied to FINDINGS + IMPRESSION: a sentence
# with a negation cue negates every concept it names (0.0); otherwise each comma-separated clause is uncertain
# (-1.0) when it holds an uncertainty cue, else positive (1.0). Per study, 1.0 beats -1.0 beats 0.0 beats blank.
CONCEPT_PATTERNS = {"Atelectasis": r"atelecta", "Cardiomegaly": r"cardiomegaly|\bheart\b|\bcardiac\b",
                    "Consolidation": r"consolidat", "Edema": r"edema", "Enlarged Cardiomediastinum": r"mediastin",
                    "Fracture": r"fracture", "Lung Lesion": r"nodul|\bmass", "Lung Opacity": r"opacit|densit",
                    "Pleural Effusion": r"effusion", "Pneumonia": r"pneumonia", "Pneumothorax": r"pneumothora",
                    "Support Devices": r"\btubes?\b|catheter|pacemaker|devices?"}
NEGATION_CUES = r"\b(no|not|without|normal|unremarkable|clear|intact|free)\b"
UNCERTAINTY_CUES = r"\b(possible|possibly|may|might|could|borderline|questionable|concerning for|cannot be excluded)\b"


def label_report(text: str) -> dict:
    """CheXpert-style labels {column: "1.0" | "0.0" | "-1.0" | ""} from a report's FINDINGS and IMPRESSION."""
    body = re.sub(r"\s+", " ", text.split("FINDINGS:", 1)[-1].replace("IMPRESSION:", " ")).lower()
    best, rank = {}, {1.0: 3, -1.0: 2, 0.0: 1}
    for sentence in split_sentences(body):  # "1.5 cm" is not a sentence break
        negated = re.search(NEGATION_CUES, sentence) is not None
        for clause in re.split(r"[,;]", sentence):
            value = 0.0 if negated else -1.0 if re.search(UNCERTAINTY_CUES, clause) else 1.0
            for column, pattern in CONCEPT_PATTERNS.items():
                if re.search(pattern, clause) and rank[value] > rank.get(best.get(column), 0):
                    best[column] = value
    if not any(best.get(c) in (1.0, -1.0) for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")):
        best["No Finding"] = 1.0
    return {c: f"{best[c]:.1f}" if c in best else "" for c in CHEXPERT_COLUMNS}


# ---------------------------------------------------------------------------------------------------------------
# The world on disk.

def _plan(studies: int, seed: int) -> list[tuple]:
    """(index, subject_id, study_id, dicom_id, split, StudyDate, StudyTime) per study: patients with one to four
    studies, the split drawn per patient (about 85% train, 5% validate, 10% test), ids in the real formats."""
    rng = np.random.default_rng([seed, 2])
    counts = []
    while sum(counts) < studies:
        counts.append(int(rng.choice([1, 2, 3, 4], p=[0.7, 0.18, 0.08, 0.04])))
    counts[-1] -= sum(counts) - studies
    subject_ids = 10_000_000 + rng.choice(9_000_000, size=len(counts), replace=False)
    study_ids = 50_000_000 + rng.choice(10_000_000, size=studies, replace=False)
    dicom_words = rng.integers(0, 2 ** 32, size=(studies, 5))  # 5 groups of 8 hex digits: 44 characters
    order, splits = rng.permutation(len(counts)), ["train"] * len(counts)
    n_test, n_validate = int(np.ceil(0.1 * len(counts))), int(np.ceil(0.05 * len(counts)))  # never empty
    for rank, patient in enumerate(order[:n_test + n_validate]):
        splits[patient] = "test" if rank < n_test else "validate"
    plan = []
    for patient, count in enumerate(counts):
        day = int(rng.integers(0, 80 * 365))  # dates shifted into the years ~2110-2190, as in MIMIC
        for _ in range(count):
            index, day, seconds = len(plan), day + int(rng.integers(1, 400)), int(rng.integers(0, 86400))
            date = (np.datetime64("2110-01-01") + np.timedelta64(day, "D")).astype(str).replace("-", "")
            clock = f"{seconds // 3600 * 10000 + seconds % 3600 // 60 * 100 + seconds % 60}.{rng.integers(1000):03d}"
            dicom_id = "-".join(f"{int(word):08x}" for word in dicom_words[index])
            plan.append((index, int(subject_ids[patient]), int(study_ids[index]), dicom_id, splits[patient], date,
                         clock))
    return plan


def _pneumothorax_rles(study: Study, regions: list) -> list[str]:
    """The Kaggle SIIM-ACR EncodedPixels of one image (docs/datasets.md §4.3): one run-length encoding per
    pneumothorax region the phantom drew (render_image's `regions`), with the leading space of the real file;
    [" -1"] for an image without one."""
    rles = [" " + rle_encode(mask) for index, _, mask in regions
            if study.findings[index].name == "pneumothorax" and mask.any()]
    return rles or [" -1"]


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _keep_freed_memory() -> None:
    """Worker initializer. glibc returns every freed block above 128 KB to the OS, so each of the ~200 numpy
    temporaries of an image is page-faulted in afresh: a quarter of the run time. Keep freed memory for reuse
    instead (glibc only; elsewhere this does nothing). Workers exit after the run, so nothing leaks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 28), libc.mallopt(-3, 1 << 28)  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD: 256 MB
    except (OSError, AttributeError):
        pass


def _generate_chunk(job) -> list[dict]:
    """Render, describe and write the studies of one chunk of the plan; returns their CSV rows."""
    root, seed, image_size, chunk = job
    results = []
    for index, subject_id, study_id, dicom_id, split, date, clock in chunk:
        study = sample_study(seed, index, subject_id, study_id, dicom_id, split)
        pixels, boxes = render_image(study, image_size, regions := [])
        report, phrases = write_report(study, np.random.default_rng([seed, 3, index]))
        os.makedirs(os.path.join(root, os.path.dirname(study.image_path)), exist_ok=True)
        jpeg = io.BytesIO()
        Image.fromarray(pixels, "L").save(jpeg, format="JPEG", quality=95)  # quality 95 as MIMIC-CXR-JPG
        _write(os.path.join(root, study.image_path), jpeg.getvalue())
        _write(os.path.join(root, study.report_path), report.encode("ascii"))
        exam = "CHEST (PA AND LAT)" if study.view == "PA" else "CHEST (PORTABLE AP)"
        view_name = "postero-anterior" if study.view == "PA" else "antero-posterior"
        orientation = "Erect" if study.view == "PA" else ["Erect", "Recumbent", ""][index % 3]
        labels, present = label_report(report), {f.name for f in study.findings}
        grounding = [[dicom_id, study.findings[i].name.title(), phrases[i], study.image_path, *box, image_size,
                      image_size] for i, _, box in boxes]
        results.append({"metadata": [dicom_id, subject_id, study_id, exam, study.view, image_size, image_size, date,
                                     clock, exam, view_name, orientation],
                        "split": [dicom_id, study_id, subject_id, split],
                        "chexpert": [subject_id, study_id] + [labels[c] for c in CHEXPERT_COLUMNS],
                        "labels": [dicom_id, subject_id, study_id, split, study.image_path] +
                                  [int(name in present) for name in FINDINGS],
                        "grounding": grounding if split == "test" else [], "devices": bool(study.devices),
                        "pneumothorax_rles": _pneumothorax_rles(study, regions),
                        "boxes": [[dicom_id, split, study.findings[i].name, side, *box] for i, side, box in boxes]})
    return results


def _write_detection_truth(folder: str, rows: list[dict], image_size: int) -> None:
    """Detection truth for every study of every split (detect.py): synthetic-boxes.csv, one row per box of every
    finding (x, y = top-left, in pixels of the written image), and an RSNA-style stage_2_train_labels.csv for
    consolidation, the world's "pneumonia" (docs/datasets.md §3.3): patientId = dicom_id, one row per box with
    Target 1, or one row with empty box fields and Target 0 for a study without a consolidation box."""
    _write_csv(os.path.join(folder, "synthetic-boxes.csv"), ["dicom_id", "split", "finding", "side", "x", "y", "w",
                                                             "h", "image_width", "image_height"],
               [box + [image_size, image_size] for r in rows for box in r["boxes"]])
    labels = []
    for r in rows:
        dicom_id = r["split"][0]
        boxes = [[dicom_id, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}", 1]
                 for _, _, name, _, x, y, w, h in r["boxes"] if name == "consolidation"]
        labels += boxes or [[dicom_id, "", "", "", "", 0]]
    _write_csv(os.path.join(folder, "stage_2_train_labels.csv"), ["patientId", "x", "y", "width", "height", "Target"],
               labels)


def _write_csv(path: str, header: list, rows: list, compress: bool = False) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode("ascii")
    _write(path, gzip.compress(data, mtime=0) if compress else data)  # mtime=0: byte-identical reruns


def generate(out_dir, studies: int, seed: int, image_size: int = 256, workers: int = 2, overwrite: bool = False,
             verbose: bool = True) -> dict:
    """Write a synthetic world of `studies` studies (one frontal image each) to `out_dir`; returns a summary. The
    world is built in a temporary sibling folder and renamed into place when complete, so that an interrupted run
    never leaves a half-written world (or file) behind."""
    if studies < 1 or image_size < 32 or workers < 1:
        raise ValueError(f"expected studies >= 1, image_size >= 32 and workers >= 1, got {studies}, {image_size}, "
                         f"{workers}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is an existing file; expected a folder for the synthetic world")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"--out {out_dir!r} exists and is not empty; choose a new folder or pass --overwrite")
        if not os.path.exists(os.path.join(out_dir, "mimic-cxr-2.0.0-metadata.csv.gz")):
            raise ValueError(f"--out {out_dir!r} holds no synthetic world (no mimic-cxr-2.0.0-metadata.csv.gz); "
                             "refusing to overwrite it")
    start = time.time()
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    temporary = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial{os.getpid()}")
    os.makedirs(temporary)
    try:
        plan, chunk = _plan(studies, seed), max(1, min(200, studies // (4 * workers)))
        jobs = [(temporary, seed, image_size, plan[i:i + chunk]) for i in range(0, studies, chunk)]
        if workers == 1:
            chunks = [_generate_chunk(job) for job in jobs]
        else:  # the workers only run numpy and PIL, so forking is safe and starts fast
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(workers, initializer=_keep_freed_memory) as pool:
                chunks = pool.map(_generate_chunk, jobs)  # results in plan order, whatever the worker count
        rows = sorted((row for c in chunks for row in c), key=lambda row: (row["split"][2], row["split"][1]))
        _write_csv(os.path.join(temporary, "mimic-cxr-2.0.0-split.csv.gz"), SPLIT_HEADER, [r["split"] for r in rows],
                   compress=True)
        _write_csv(os.path.join(temporary, "mimic-cxr-2.0.0-chexpert.csv.gz"), ["subject_id", "study_id"] +
                   CHEXPERT_COLUMNS, [r["chexpert"] for r in rows], compress=True)
        _write_csv(os.path.join(temporary, "MS_CXR_Local_Alignment_v1.0.0.csv"), MS_CXR_HEADER,
                   [box for r in rows for box in r["grounding"]])
        _write_csv(os.path.join(temporary, "synthetic-labels.csv"), ["dicom_id", "subject_id", "study_id", "split",
                                                                     "path"] + FINDINGS, [r["labels"] for r in rows])
        _write_csv(os.path.join(temporary, "train-rle.csv"), ["ImageId", " EncodedPixels"],  # the Kaggle header
                   [[r["split"][0], rle] for r in rows for rle in r["pneumothorax_rles"]])
        _write_csv(os.path.join(temporary, "mimic-cxr-2.0.0-metadata.csv.gz"), METADATA_HEADER,
                   [r["metadata"] for r in rows], compress=True)
        _write_detection_truth(temporary, rows, image_size)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # empty, or a synthetic world that --overwrite replaces
        os.replace(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    findings = {name: sum(r["labels"][5 + i] for r in rows) for i, name in enumerate(FINDINGS)}
    summary = {"out": out_dir, "studies": studies, "patients": len({r["split"][2] for r in rows}),
               "splits": {s: sum(r["split"][3] == s for r in rows) for s in ("train", "validate", "test")},
               "normal": sum(not any(r["labels"][5:]) for r in rows), "devices": sum(r["devices"] for r in rows),
               "findings": findings, "grounding_rows": sum(len(r["grounding"]) for r in rows),
               "seconds": round(time.time() - start, 1)}
    if verbose:
        print(f"wrote {studies} studies of {summary['patients']} patients to {out_dir} in {summary['seconds']} s\n"
              f"  studies per split: {summary['splits']}\n  normal studies {summary['normal']}, with support "
              f"devices {summary['devices']}, grounding rows (test split) {summary['grounding_rows']}\n"
              f"  studies per finding: {findings}")
    return summary


@dataclass
class SyntheticConfig:
    out: str = option("data/synthetic", "output folder (must not exist, or be empty)")
    studies: int = option(6000, "number of studies, one frontal image each", minimum=1)
    seed: int = option(0, "random seed; the same seed writes identical files", minimum=0)
    image_size: int = option(256, "side of the square images in pixels, e.g. 448", minimum=32)
    workers: int = option(2, "worker processes (1: all in this process)", minimum=1)
    overwrite: bool = option(False, "replace a synthetic world already at --out")

    def __post_init__(self):
        check_options(self)


def main(argv=None) -> int:
    return run_script(SyntheticConfig, lambda c: generate(c.out, c.studies, c.seed, c.image_size, c.workers,
                                                          c.overwrite) and 0, argv, __doc__, errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
