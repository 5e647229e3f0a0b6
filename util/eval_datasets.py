"""Evaluation sets in their real on-disk formats, for zero-shot classification and phrase grounding.

Formats: docs/datasets.md §2 (NIH ChestX-ray14), §3 (RSNA Pneumonia), §4 (SIIM-ACR), §5 (CheXpert),
§6 (MS-CXR), and the synthetic world of synthetic.py (MIMIC-CXR-JPG layout, §1; D13), whose test split has
true labels in synthetic-labels.csv and grounding boxes in an MS-CXR-format CSV. Box and mask conventions:
docs/method.md §9.

Every loader returns plain items (an image path plus a label vector, or a phrase with its boxes); the two
`Dataset` classes at the bottom turn them into model inputs with the shared `data.preprocess_image` (D8).
Labels are float32 with 1 = positive, 0 = negative and NaN = uncertain, to be ignored by the metrics.
The project reads no DICOM (its packages are torch, torchvision, tokenizers, numpy and Pillow, and Pillow cannot
decode DICOM), so DICOM files must first be converted to PNG or JPEG with the same folder layout and file stem
(docs/datasets.md says how).
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import MS_CXR_HEADER, check_root, preprocess_image, read_csv

NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
CHEXPERT_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
# MaCo's CheXpert split files (docs/datasets.md §5.3): U-Ones for these three, U-Zeros for the other two.
CHEXPERT_MACO_UONES = {"Atelectasis", "Edema", "Pleural Effusion"}
# zero-shot class names (lower-cased for the prompts, docs/method.md §8) in each set's label order; the synthetic
# world's come from the header of its synthetic-labels.csv (synthetic_class_names)
CLASS_NAMES = {"nih": [name.replace("_", " ").lower() for name in NIH_LABELS], "rsna": ["lung opacity"],
               "siim": ["pneumothorax"], "chexpert": [name.lower() for name in CHEXPERT_LABELS]}
DATASETS = ("synthetic", "nih", "rsna", "siim", "chexpert", "ms-cxr")  # what load_benchmark reads
SYNTHETIC_LABELS_CSV = "synthetic-labels.csv"
SYNTHETIC_ID_COLUMNS = ["dicom_id", "subject_id", "study_id", "split", "path"]  # then one 0/1 column per finding
MS_CXR_CSV = "MS_CXR_Local_Alignment_v1.0.0.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class LabelledImage:
    path: str
    labels: np.ndarray  # (C,) float32: 1 positive, 0 negative, NaN uncertain
    rle: tuple = ()  # SIIM only: the run-length encodings of the image's mask regions


@dataclass
class GroundingPair:
    path: str
    phrase: str
    category: str
    boxes: list  # [(x, y, w, h), ...] in original image pixels, x, y = top-left
    width: int  # original image size, the frame of the boxes
    height: int


# ----------------------------------------------------------------------------- file helpers

def _read_list(path) -> list[list[str]]:
    """A whitespace-separated split list (CRLF, trailing spaces and no final newline are all tolerated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found (expected one '<image> [labels...]' per line)")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"split list {path} is empty (expected one '<image> [labels...]' per line)")
    return lines


def _dicom_error(path) -> ValueError:
    return ValueError(f"{path} is a DICOM file and this project has no DICOM reader (pydicom is not a dependency). "
                      "Convert the images to PNG or JPEG with the same folder layout and file stem "
                      "(e.g. stage_2_train_images/<patientId>.png) and run again.")


def _find_image(stem_path: Path) -> Path | None:
    """`stem_path` with an image suffix that exists, else the DICOM file of that stem if there is one (the caller
    skips or refuses it), else None."""
    if stem_path.suffix.lower() in IMAGE_SUFFIXES and stem_path.is_file():
        return stem_path
    for suffix in IMAGE_SUFFIXES + (".dcm",):
        candidate = stem_path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _index_images(folder: Path) -> dict[str, str]:
    """File name -> path of every PNG/JPEG in `folder` and below it, from one directory walk (in sorted order, so
    of two files with the same name the first in path order wins; linked folders are followed)."""
    index = {}
    for current, subfolders, names in os.walk(folder, followlinks=True):
        subfolders.sort()
        for name in sorted(names):
            if name.lower().endswith(IMAGE_SUFFIXES):
                index.setdefault(name, os.path.join(current, name))  # strings: 112,120 Paths are slow
    return index


def _folders_of(paths: list[str], root: Path) -> str:
    """The folders that hold `paths`, relative to `root`: "images/", or "images_001/images/, …,
    images_012/images/ (12 folders)" for many."""
    folders = sorted({os.path.relpath(folder, root) for folder in {os.path.dirname(path) for path in paths}})
    names = ["the root folder" if folder == "." else folder + "/" for folder in folders]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, …, {names[-1]} ({len(names)} folders)"


def _keep_existing(items: list, source: str) -> list:
    """Drop items whose image is missing, with a counted message; none found at all is an error."""
    kept = [item for item in items if item.path is not None]
    if not kept:
        raise FileNotFoundError(f"{source}: none of the {len(items)} listed images were found; check the root folder")
    if len(kept) < len(items):
        print(f"{source}: skipped {len(items) - len(kept)} of {len(items)} items whose image file is missing")
    return kept


# ----------------------------------------------------------------------------- zero-shot classification sets

def load_nih(root, split_file: str = "test_list.txt", image_dir: str | None = None) -> list[LabelledImage]:
    """NIH ChestX-ray14 (§2). `split_file` lines are `<name>` (official lists) or `<name> <14 ints>` (MaCo's
    lists, whose labels are used as given); names without labels take theirs from Data_Entry_2017*.csv.

    Each image is found by its name wherever the layouts of §2.1 put it: images/ (NIH archives), images_001/images/
    … images_012/images/ (Kaggle), images/images_all/ (MaCo) or flat in `root`. The folders are indexed once;
    `image_dir` (relative to `root`, or absolute) limits the search to that folder and those below it."""
    root = check_root(root, "NIH ChestX-ray14")
    lines = _read_list(root / split_file)
    labels_by_name = {}
    if any(len(line) != 1 + len(NIH_LABELS) for line in lines):
        csv_path = next((root / n for n in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv") if (root / n).is_file()),
                        root / "Data_Entry_2017_v2020.csv")
        rows = read_csv(csv_path, ["Image Index", "Finding Labels"],
                        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
        for row in rows:
            findings = set(row["Finding Labels"].split("|"))
            labels_by_name[row["Image Index"]] = [float(label in findings) for label in NIH_LABELS]
    folder = root if image_dir is None else root / image_dir  # an absolute image_dir replaces root
    if not folder.is_dir():
        raise FileNotFoundError(f"NIH image folder {folder} (--image-dir) is not a folder")
    index = _index_images(folder)  # name -> path: 112,120 names in one walk, not one search per listed image
    items = []
    for line in lines:
        name = line[0]
        if len(line) == 1 + len(NIH_LABELS):
            labels = [float(v) for v in line[1:]]
        elif name in labels_by_name:
            labels = labels_by_name[name]
        else:
            raise ValueError(f"{root / split_file}: {name} has no labels in the list nor in the Data_Entry CSV")
        items.append(LabelledImage(index.get(os.path.basename(name)), np.array(labels, np.float32)))
    found = [item.path for item in items if item.path]
    if not found:
        layouts = ("--image-dir" if image_dir is not None else "the layouts images/ (NIH archives), images_001/images/"
                   " … images_012/images/ (Kaggle), images/images_all/ (MaCo) and flat")
        raise FileNotFoundError(f"NIH: none of the {len(items)} images listed in {split_file} (e.g. {lines[0][0]}) is "
                                f"among the {len(index)} PNG/JPEG files in {folder} and every folder below it "
                                f"({layouts}; docs/datasets.md §2.1)")
    print(f"NIH {root}: {len(found)} of {len(items)} listed images found in {_folders_of(found, root)}")
    return _keep_existing(items, f"NIH {root}")


def load_rsna(root, split_file: str | None = "test_list.txt") -> list[LabelledImage]:
    """RSNA Pneumonia (§3), one class (Lung Opacity). MaCo's split lines are `<relpath.dcm> <Target>`; without a
    split list every patient of stage_2_train_labels.csv is used. Images: the same path as PNG or JPEG; one left
    as DICOM is a counted skip, a folder with nothing but DICOM files an error (convert them first)."""
    root = check_root(root, "RSNA Pneumonia")
    targets = {}
    lines = _read_list(Path(root, split_file)) if split_file else None
    if lines is None or any(len(line) < 2 for line in lines):
        rows = read_csv(root / "stage_2_train_labels.csv", ["patientId", "Target"], "patientId,x,y,width,height,Target")
        for row in rows:  # one row per box: a patient is positive if any row is
            targets[row["patientId"]] = max(targets.get(row["patientId"], 0.0), float(row["Target"]))
    if lines is None:
        lines = [[f"stage_2_train_images/{pid}.dcm"] for pid in targets]
    items, dicoms = [], []
    for line in lines:
        relpath = line[0]
        if len(line) == 1 and Path(relpath).stem not in targets:
            raise ValueError(f"{split_file}: {relpath} has no label in the list nor in stage_2_train_labels.csv")
        label = float(line[1]) if len(line) > 1 else targets[Path(relpath).stem]
        path = _find_image(root / relpath)
        if path is not None and path.suffix.lower() == ".dcm":
            dicoms.append(path)
            continue
        items.append(LabelledImage(str(path) if path else None, np.array([label], np.float32)))
    if dicoms:
        if not any(item.path for item in items):  # nothing converted yet
            raise _dicom_error(dicoms[0])
        print(f"RSNA {root}: skipped {len(dicoms)} of {len(lines)} listed images that are still DICOM "
              f"(e.g. {dicoms[0]}); convert them to PNG or JPEG to include them")
    return _keep_existing(items, f"RSNA {root}")


def rle_decode(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """SIIM run-length encoding (§4.3) -> bool mask (height, width). Pairs (gap, length): the first gap is the
    0-based start, each later gap counts background pixels since the previous run; pixels are column-major."""
    flat = np.zeros(height * width, dtype=bool)
    values = [int(v) for v in rle.split()]
    if values != [-1] and (len(values) % 2 or min(values, default=0) < 0):
        raise ValueError(f"run-length encoding {rle.strip()[:40]!r}: expected (gap, length) pairs of non-negative "
                         f"numbers, or -1")
    if values != [-1] and sum(values) > height * width:  # the last run ends at sum(values)
        raise ValueError(f"run-length encoding {rle.strip()[:40]!r}... ends at pixel {sum(values)}, beyond the "
                         f"{height}x{width} = {height * width} pixels of its image")
    if values != [-1]:
        position = 0
        for gap, length in zip(values[0::2], values[1::2]):
            position += gap
            flat[position:position + length] = True
            position += length
    return flat.reshape(width, height).T  # column-major: x outer, y inner


def rle_encode(mask: np.ndarray) -> str:
    """Inverse of `rle_decode`: bool mask (H, W) -> the relative column-major RLE ("-1" if empty)."""
    padded = np.concatenate([[0], mask.T.flatten().astype(np.int8), [0]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    if len(starts) == 0:
        return "-1"
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{gap} {length}" for gap, length in zip(gaps, ends - starts))


def load_siim(root, split_file: str | None = None) -> list[LabelledImage]:
    """SIIM-ACR Pneumothorax (§4): label = any mask region in train-rle.csv; images found anywhere under `root`
    by their ImageId stem (the real tree nests Study/Series/SOP). `split_file`: one ImageId per line."""
    root = check_root(root, "SIIM-ACR")
    rles = {}  # several rows per image, one per region; values may carry a leading space
    for row in read_csv(root / "train-rle.csv", ["ImageId", "EncodedPixels"], "ImageId, EncodedPixels"):
        rle = row["EncodedPixels"].strip()
        rles.setdefault(row["ImageId"].strip(), [])
        if rle != "-1":
            rles[row["ImageId"].strip()].append(rle)
    ids = [line[0] for line in _read_list(Path(root, split_file))] if split_file else list(rles)
    files, dicoms = {}, {}
    for folder, _, names in os.walk(root):
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                files[stem] = os.path.join(folder, name)
            elif suffix.lower() == ".dcm":
                dicoms[stem] = os.path.join(folder, name)
    if ids and not any(i in files for i in ids) and any(i in dicoms for i in ids):
        raise _dicom_error(dicoms[next(i for i in ids if i in dicoms)])
    missing_labels = [i for i in ids if i not in rles]
    if missing_labels:
        raise ValueError(f"{split_file}: ImageId {missing_labels[0]} is not in {root / 'train-rle.csv'}")
    items = [LabelledImage(files.get(i), np.array([float(bool(rles[i]))], np.float32), tuple(rles[i])) for i in ids]
    return _keep_existing(items, f"SIIM {root}")


def siim_mask(item: LabelledImage, height: int = 1024, width: int = 1024) -> np.ndarray:
    """The union of a SIIM image's mask regions, (height, width) bool."""
    mask = np.zeros((height, width), dtype=bool)
    for rle in item.rle:
        mask |= rle_decode(rle, height, width)
    return mask


def load_chexpert(root, split: str = "valid", uncertain: str = "maco", frontal_only: bool = True) -> list[LabelledImage]:
    """CheXpert (§5): the 5 competition labels from train.csv / valid.csv. `root` is the dataset folder (or
    its parent). Uncertain (-1.0): 'maco' = U-Ones for Atelectasis, Edema, Pleural Effusion and U-Zeros for
    the others (MaCo's split files), 'ones', 'zeros' or 'ignore' (NaN); blank -> 0. frontal_only (default):
    lateral views are dropped and counted (MaCo's own split lists keep them, §5.3)."""
    if uncertain not in ("maco", "ones", "zeros", "ignore"):
        raise ValueError(f"uncertain policy {uncertain!r}: expected maco, ones, zeros or ignore")
    root = check_root(root, "CheXpert")
    folder = next((d for d in (root, root / "CheXpert-v1.0-small", root / "CheXpert-v1.0") if (d / f"{split}.csv").is_file()),
                  root)
    rows = read_csv(folder / f"{split}.csv", ["Path", "Frontal/Lateral"] + CHEXPERT_LABELS,
                             "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                             "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                             "Pleural Effusion,Pleural Other,Fracture,Support Devices")
    items, laterals = [], 0
    for row in rows:
        if frontal_only and row["Frontal/Lateral"] != "Frontal":
            laterals += 1
            continue
        labels = []
        for name in CHEXPERT_LABELS:
            value = float(row[name] or 0.0)
            if value == -1.0:
                ones = uncertain == "ones" or (uncertain == "maco" and name in CHEXPERT_MACO_UONES)
                value = float("nan") if uncertain == "ignore" else float(ones)
            labels.append(value)
        # `Path` starts with the dataset folder's own name (CheXpert-v1.0-small/...): resolve it inside `folder`
        path = folder / Path(*Path(row["Path"]).parts[1:])
        items.append(LabelledImage(str(path) if path.is_file() else None, np.array(labels, np.float32)))
    if frontal_only:
        print(f"CheXpert {folder / f'{split}.csv'}: {len(items)} frontal images; dropped {laterals} lateral "
              "(--no-frontal-only keeps them)")
    return _keep_existing(items, f"CheXpert {folder / f'{split}.csv'}")


def load_chexpert_list(root, split_file) -> list[LabelledImage]:
    """CheXpert through one of MaCo's split files (§5.3): lines `<Path> a b c d e`, the 5 competition labels as
    0/1 in CHEXPERT_LABELS order (uncertain labels already resolved). `Path` starts with CheXpert-v1.0-small/:
    `root` is its parent folder (as released) or the dataset folder itself."""
    root = check_root(root, "CheXpert")
    items = []
    for line in _read_list(Path(root, split_file)):
        if len(line) != 1 + len(CHEXPERT_LABELS):
            raise ValueError(f"{split_file}: line {' '.join(line)!r} has {len(line) - 1} labels; CheXpert split lines "
                             f"are '<Path> <{len(CHEXPERT_LABELS)} labels>' ({', '.join(CHEXPERT_LABELS)})")
        relative = Path(line[0])
        path = next((p for p in (root / relative, root / Path(*relative.parts[1:])) if p.is_file()), None)
        items.append(LabelledImage(str(path) if path else None, np.array([float(v) for v in line[1:]], np.float32)))
    return _keep_existing(items, f"CheXpert {root}")


def synthetic_class_names(root) -> list[str]:
    """The finding names of a synthetic world, in order: the columns of its synthetic-labels.csv after the ids."""
    path = Path(root) / SYNTHETIC_LABELS_CSV
    header = next(read_csv(path, SYNTHETIC_ID_COLUMNS), None)
    if header is None:
        raise ValueError(f"{path} has no rows; regenerate the world with `python -m world.synthetic`")
    names = [name for name in header if name not in SYNTHETIC_ID_COLUMNS]
    if not names:
        raise ValueError(f"{path} has no finding columns after {','.join(SYNTHETIC_ID_COLUMNS)}")
    return names


def load_synthetic(root, class_names: list[str] | None = None, split: str = "test") -> list[LabelledImage]:
    """The synthetic world's (D13) images of one split with their true findings from synthetic-labels.csv (0/1
    per finding; the CheXpert CSV cannot tell a nodule from a mass). class_names: default every finding column."""
    root = check_root(root, "synthetic world")
    class_names = class_names or synthetic_class_names(root)
    rows = read_csv(root / SYNTHETIC_LABELS_CSV, ["split", "path"] + class_names,
                    ",".join(SYNTHETIC_ID_COLUMNS + class_names))
    items = [LabelledImage(str(root / row["path"]) if (root / row["path"]).is_file() else None,
                           np.array([float(row[name]) for name in class_names], np.float32))
             for row in rows if row["split"] == split]
    if not items:
        raise ValueError(f"{root / SYNTHETIC_LABELS_CSV}: no images in split {split!r} (expected train, validate or test)")
    return _keep_existing(items, f"synthetic {root}")


# ----------------------------------------------------------------------------- MaCo's released split files

# released split files (docs/datasets.md): the folder of each set, and the labels on each line (SIIM: none)
SPLIT_FOLDERS = {"nih": "NIH_ChestX-ray", "chexpert": "CheXpert", "rsna": "RSNA_Pneumonia",
                 "siim": "SIIM-ACR_Pneumothorax"}
SPLIT_CLASSES = {"nih": NIH_LABELS, "chexpert": CHEXPERT_LABELS, "rsna": ["Lung Opacity"],
           "siim": ["Pneumothorax"]}
LABELS_PER_LINE = {"nih": 14, "chexpert": 5, "rsna": 1, "siim": 0}
TRAIN_FILES = {0.01: "train_1", 0.1: "train_10", 1.0: "train_list"}


def read_split_file(path, labels_per_line: int) -> list[tuple[str, np.ndarray]]:
    """One released split file: `<image> <labels...>` per line, whitespace-separated (CRLF, trailing spaces and a
    missing final newline are fine). Returns [(image, labels (labels_per_line,) float32)]. A missing or empty file,
    or a line with another number of labels, is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found (the released DatasetsSplits/<set>/"
                                f"{{train_1,train_10,train_list,val_list,test_list}}.txt, docs/datasets.md)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1 + labels_per_line:
            raise ValueError(f"{path}, line {number}: {len(fields) - 1} labels after the image, expected "
                             f"{labels_per_line}; is this the split file of another data set?")
        try:
            rows.append((fields[0], np.array(fields[1:], dtype=np.float32)))
        except ValueError:
            raise ValueError(f"{path}, line {number}: the labels {fields[1:]} are not numbers") from None
    if not rows:
        raise ValueError(f"split file {path} is empty (expected one '<image> [labels...]' per line)")
    return rows


def split_path(split_dir, data: str, name: str) -> Path:
    """DatasetsSplits/<set folder>/<name>.txt, or <name>.txt when --split-dir is that set's folder itself."""
    candidates = [Path(split_dir) / SPLIT_FOLDERS[data] / f"{name}.txt", Path(split_dir) / f"{name}.txt"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"split file {name}.txt not found: looked for {candidates[0]} and {candidates[1]}")
    return found


def load_split(data: str, root, split_dir, name: str) -> list[LabelledImage]:
    """The images of one released split file, through the data set's loader in py."""
    path = split_path(split_dir, data, name)
    rows = read_split_file(path, LABELS_PER_LINE[data])
    if data == "nih":
        items = load_nih(root, split_file=str(path.resolve()))
    elif data == "chexpert":
        items = load_chexpert_list(root, path.resolve())
    elif data == "rsna":
        items = load_rsna(root, split_file=str(path.resolve()))
    else:
        items = load_siim(root, split_file=str(path.resolve()))
    print(f"{path}: {len(items)} of {len(rows)} listed images")
    return items


# ----------------------------------------------------------------------------- RSNA Pneumonia boxes (detection)

RSNA_BOX_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]


@dataclass
class BoxedImage:
    patient_id: str
    path: str
    boxes: np.ndarray  # (K, 4) float32 (x, y, width, height), x, y = top-left, in pixels of the image file; K may be 0
    width: int
    height: int


def read_box_labels(path) -> dict[str, np.ndarray]:
    """patientId -> its boxes (K, 4) (x, y, width, height) from an RSNA stage_2_train_labels.csv (§3.3): one row
    per box (Target 1), or one row with empty box fields (Target 0, K = 0). A malformed row is an error naming it."""
    boxes = {}
    for number, row in enumerate(read_csv(path, RSNA_BOX_COLUMNS, ",".join(RSNA_BOX_COLUMNS)), start=2):
        patient_id, target = row["patientId"].strip(), row["Target"].strip()
        boxes.setdefault(patient_id, [])
        if target in ("0", "0.0"):
            continue
        try:
            if target not in ("1", "1.0"):
                raise ValueError
            x, y, width, height = (float(row[key]) for key in ("x", "y", "width", "height"))
        except ValueError:
            raise ValueError(f"{path}, row {number}: expected Target 0 (no box) or 1 with numbers x, y, width, "
                             f"height; got {','.join(row[k] for k in RSNA_BOX_COLUMNS)!r}") from None
        if not width > 0 or not height > 0:
            raise ValueError(f"{path}, row {number}: the box of {patient_id} has width {width} and height {height}; "
                             f"both must be positive")
        boxes[patient_id].append((x, y, width, height))
    return {key: np.array(value, np.float32).reshape(-1, 4) for key, value in boxes.items()}


def index_images(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(stem -> path of every PNG/JPEG under root, stem -> path of every DICOM file), from one walk in sorted order
    (of two images with one stem, the first path wins)."""
    images, dicoms = {}, {}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            found = images if suffix.lower() in IMAGE_SUFFIXES else dicoms if suffix.lower() == ".dcm" \
                else {}
            found.setdefault(stem, os.path.join(folder, name))
    return images, dicoms


def boxed_images(ids: list[str], boxes: dict, images: dict, dicoms: dict, source: str) -> list[BoxedImage]:
    """The items of `ids` whose image is found. Left out and counted: an image still DICOM, a missing image, a box
    not inside its image (the boxes are in pixels of the image file: convert the DICOM files without resizing)."""
    items, still_dicom, missing, outside = [], [], 0, []
    for patient_id in ids:
        if patient_id not in images:
            still_dicom += [dicoms[patient_id]] if patient_id in dicoms else []
            missing += patient_id not in dicoms
            continue
        with Image.open(images[patient_id]) as image:
            width, height = image.size
        own = boxes[patient_id]
        inside = ((own[:, 0] >= 0) & (own[:, 1] >= 0) & (own[:, 0] + own[:, 2] <= width)
                  & (own[:, 1] + own[:, 3] <= height))
        outside += [f"{patient_id} {tuple(map(float, box))} in a {width}x{height} image" for box in own[~inside]]
        items.append(BoxedImage(patient_id, images[patient_id], own[inside], width, height))
    if not items:
        hint = (f"they are DICOM files (e.g. {still_dicom[0]}); convert them to PNG or JPEG with the same stem"
                if still_dicom else "check --root")
        raise FileNotFoundError(f"{source}: none of the {len(ids)} images was found under the root folder: {hint}")
    if still_dicom or missing:
        print(f"{source}: skipped {len(still_dicom)} images still DICOM and {missing} not found, of {len(ids)}")
    if outside:
        print(f"{source}: skipped {len(outside)} boxes not inside their image, e.g. {outside[0]}")
    return items


# ----------------------------------------------------------------------------- grounding (MS-CXR format)

def load_ms_cxr(csv_path, image_root) -> list[GroundingPair]:
    """MS-CXR CSV (§6.2): one row per box; rows are grouped into (image, lower-cased phrase) pairs (§9).
    `image_root` is the MIMIC-CXR-JPG folder that holds `files/` (the CSV's `path` starts with files/)."""
    csv_path, image_root = Path(csv_path), check_root(image_root, "MIMIC-CXR-JPG (the MS-CXR images)")
    if csv_path.is_dir():
        csv_path = csv_path / MS_CXR_CSV
    pairs = {}
    for row in read_csv(csv_path, MS_CXR_HEADER, ",".join(MS_CXR_HEADER) + "[,split]"):
        key = (row["path"], row["label_text"].strip().lower())
        if key not in pairs:
            path = image_root / row["path"]
            pairs[key] = GroundingPair(str(path) if path.is_file() else None, row["label_text"].strip(),
                                       row["category_name"], [], int(row["image_width"]), int(row["image_height"]))
        pairs[key].boxes.append(tuple(float(row[k]) for k in ("x", "y", "w", "h")))
    return _keep_existing(list(pairs.values()), f"MS-CXR {csv_path}")


def letterbox_geometry(width: int, height: int, size: int) -> tuple[float, int, int]:
    """Scale r = size / max(w, h) and the (left, top) offset of the letterboxed content: the long side goes to
    `size`, the short one to floor(short * size / long) and is zero-padded symmetrically, floor(pad / 2)
    before (official eval/box_transfer.py, §9; the same frame as data.preprocess_image(resize="letterbox"))."""
    long_side = max(width, height)
    new_w, new_h = width * size // long_side, height * size // long_side  # exact integer floor, as data.py
    return size / long_side, (size - new_w) // 2, (size - new_h) // 2


def letterbox_box(box, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) in original pixels -> integer (x', y', w', h') in the size x size letterboxed frame."""
    x, y, w, h = box
    scale, left, top = letterbox_geometry(width, height, size)
    return math.floor(x * scale + left), math.floor(y * scale + top), math.floor(w * scale), math.floor(h * scale)


def boxes_to_mask(boxes, width: int, height: int, size: int) -> np.ndarray:
    """Union of the letterboxed boxes (a project rule: the released code sums them), (size, size) bool."""
    mask = np.zeros((size, size), dtype=bool)
    for box in boxes:
        x, y, w, h = letterbox_box(box, width, height, size)
        mask[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = True  # rows y'..y'+h'-1, columns x'..x'+w'-1
    return mask


# ----------------------------------------------------------------------------- torch datasets

def load_image(path, size: int, in_chans: int, resize: str) -> torch.Tensor:
    """data.preprocess_image of the file at `path`; an unreadable file is a ValueError naming it."""
    try:
        with Image.open(path) as image:  # still undecoded: preprocess_image can let libjpeg decode at reduced size
            return preprocess_image(image, size, in_chans, resize)
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


class ClassificationDataset(torch.utils.data.Dataset):
    """(image (in_chans, size, size), labels (C,)) from `LabelledImage` items. `resize`: "crop" (short side to
    `size`, centre crop) as the released zero-shot script (§8), or "letterbox"."""

    def __init__(self, items: list[LabelledImage], size: int, in_chans: int = 3, resize: str = "crop"):
        self.items, self.size, self.in_chans, self.resize = items, size, in_chans, resize

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        return load_image(item.path, self.size, self.in_chans, self.resize), torch.from_numpy(item.labels)


class GroundingDataset(torch.utils.data.Dataset):
    """dict(image (in_chans, size, size) letterboxed, mask (size, size) bool box region, phrase, category, path)."""

    def __init__(self, pairs: list[GroundingPair], size: int, in_chans: int = 3):
        self.pairs, self.size, self.in_chans = pairs, size, in_chans

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        image = load_image(pair.path, self.size, self.in_chans, "letterbox")
        mask = boxes_to_mask(pair.boxes, pair.width, pair.height, self.size)
        return dict(image=image, mask=torch.from_numpy(mask), phrase=pair.phrase, category=pair.category, path=pair.path)


def load_benchmark(name: str, root, size: int, in_chans: int, split_file: str = "", split: str = "",
                   uncertain: str = "maco", mimic_root: str = "", limit: int | None = None, image_dir: str = "",
                   frontal_only: bool = True):
    """The evaluation set `name` as model inputs of side `size`: (zero-shot task (ClassificationDataset, class
    names, prompt set) or None, GroundingDataset or None). Empty strings select each set's default; image_dir:
    NIH only, frontal_only: CheXpert only."""
    root, items, grounding, class_names = Path(root), None, None, CLASS_NAMES.get(name)
    if name == "synthetic":  # its test split has both tasks
        class_names = synthetic_class_names(root)
        items = load_synthetic(root, class_names, split or "test")
        grounding = load_ms_cxr(root / MS_CXR_CSV, root)
    elif name == "nih":
        items = load_nih(root, split_file or "test_list.txt", image_dir or None)
    elif name == "rsna":
        items = load_rsna(root, split_file or None)
    elif name == "siim":
        items = load_siim(root, split_file or None)
    elif name == "chexpert":
        items = load_chexpert(root, split or "valid", uncertain, frontal_only)
    elif name == "ms-cxr":
        if not mimic_root:
            raise ValueError("--data ms-cxr needs --mimic-root, the MIMIC-CXR-JPG folder that holds files/")
        grounding = load_ms_cxr(root, mimic_root)
    else:
        raise ValueError(f"--data {name!r}: expected synthetic, nih, rsna, siim, chexpert or ms-cxr")
    zero_shot = None if items is None else (ClassificationDataset(items[:limit], size, in_chans), class_names,
                                            "siim" if name == "siim" else "default")
    return zero_shot, None if grounding is None else GroundingDataset(grounding[:limit], size, in_chans)
