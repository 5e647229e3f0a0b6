"""Image-report data for MaCo: MIMIC-CXR-JPG, Open-i, report captions, image preprocessing and an image cache.

docs/method.md §5 (report captions, D6), §7.2 (augmentation and normalisation, D8), §4 (padding);
docs/datasets.md §1 (MIMIC-CXR-JPG layout, CSVs, report .txt, mimic_cxr_sectioned.csv) and §7 (Open-i XML).
The synthetic world of world/synthetic.py is written in the MIMIC-CXR-JPG layout, so MimicCXR reads it too (D13).

Image cache: `python data.py cache` resizes every image of data/synthetic once into data/synthetic/cache-128, what
the default run reads (`--root /data/mimic-cxr-jpg/2.0.0 --size 448` for the `base` preset): images.npy, a uint8
(N, S, S) memory map; ids.txt; status.npy; progress.json.
"""
import csv
import dataclasses
import functools
import gzip
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from util.checkpoint import WriteError, read_json, write_atomic
from util.cli import check_options, option, run_script
from util.progress import Progress, lines_every, progress_interval_option
from util.run_guard import OutDirLock
from util.tokenizer import encode_texts

IMAGE_MEAN = 0.4978  # D8: pixel statistics of the released pre-training, images scaled to [0, 1]
IMAGE_STD = 0.2449
RESIZE_MODES = ("letterbox", "crop")
FRONTAL_VIEWS = ("PA", "AP")
REPORT_SECTIONS = ("findings", "impression", "last_paragraph")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "split")
SECTIONED_COLUMNS = ("study", "impression", "findings", "last_paragraph", "comparison")
# MS-CXR's CSV (docs/datasets.md §6.2), which the synthetic world also writes for its test split
MS_CXR_HEADER = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
# Report sections that give context, not findings: never used as the fallback caption of a report.
CONTEXT_SECTIONS = {"examination", "indication", "history", "clinical history", "technique", "comparison"}


# ----------------------------------------------------------------------------------------------------------
# Images (D8)

def grey_8bit(image: Image.Image) -> Image.Image:
    """8-bit grey. 16-bit PNGs and float images are min-max scaled to 8 bits first, as MIMIC-CXR-JPG was made
    (a plain convert would clip them)."""
    if image.mode in ("I", "I;16", "F"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round((array - array.min()) / max(np.ptp(array), 1e-12) * 255).astype(np.uint8))
    return image.convert("L")


def resize_to_square(image: Image.Image, size: int, resize: str = "letterbox") -> np.ndarray:
    """8-bit greyscale square of side `size`: uint8 (size, size). Bicubic resampling (antialiased by PIL).

    letterbox (default): long side -> `size`, short side zero-padded symmetrically, as the released grounding
    images and MS-CXR box arithmetic assume (docs/method.md §9); nothing is cut off, so apices and costophrenic
    angles (effusion, pneumothorax) stay in view. crop: short side -> `size`, then a centre crop, as the
    released zero-shot script (§8). A JPEG fresh from Image.open is decoded at a reduced scale no smaller
    than needed (libjpeg DCT scaling): several times faster on full-size MIMIC images.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    width, height = image.size
    reference = max(width, height) if resize == "letterbox" else min(width, height)
    # integer floor, as eval/box_transfer.py: the reference side becomes exactly `size`
    new_w, new_h = max(1, width * size // reference), max(1, height * size // reference)
    image.draft("L", (new_w, new_h))  # no-op unless a not-yet-decoded JPEG
    image = grey_8bit(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    if resize == "crop":
        left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
        return np.asarray(image.crop((left, top, left + size, top + size)))
    square = np.zeros((size, size), dtype=np.uint8)  # pad with black (0), like the released letterbox
    top, left = (size - new_h) // 2, (size - new_w) // 2
    square[top:top + new_h, left:left + new_w] = np.asarray(image)
    return square


def to_model_input(pixels: np.ndarray, in_chans: int = 3) -> torch.Tensor:
    """uint8 (S, S) -> float (in_chans, S, S): scale to [0, 1], normalise (D8), replicate the grey channel."""
    x = (torch.from_numpy(np.array(pixels, dtype=np.float32)) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    return x.expand(in_chans, -1, -1).contiguous()


def preprocess_image(image: Image.Image, size: int, in_chans: int = 3, resize: str = "letterbox") -> torch.Tensor:
    """The one preprocessing shared by training and evaluation (D8): PIL image -> float (in_chans, size, size):
    greyscale, square resize (resize_to_square), [0, 1], (x - 0.4978) / 0.2449, grey copied to in_chans."""
    return to_model_input(resize_to_square(image, size, resize), in_chans)


def augment_image(pixels: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """Training augmentation (§7.2) of the uint8 (S, S) image at full (SR) size, before normalisation.

    Horizontal flip p = 0.5, then rotation uniform in ±20° and scale uniform in [0.8, 1.2], no translation or
    shear. Done in PIL form on 8-bit pixels, so the fill 0 is the black pixel, as released (after
    normalisation 0 would be mid-grey), and 3x faster than the tensor form. Bilinear rather than the
    released default nearest-neighbour: no jagged edges on rotated ribs.
    """
    image = Image.fromarray(pixels)
    if torch.rand((), generator=generator) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = (torch.rand((), generator=generator).item() * 2 - 1) * 20.0
    scale = 0.8 + 0.4 * torch.rand((), generator=generator).item()
    image = TF.affine(image, angle=angle, translate=[0.0, 0.0], scale=scale, shear=[0.0, 0.0],
                      interpolation=InterpolationMode.BILINEAR, fill=0)
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------------------
# Report text (D6)

SENTENCE_BREAK = re.compile(r"(?<!\d)\.|\.(?!\d)")  # every "." except one with a digit on both sides ("1.5")
LIST_NUMBER = re.compile(r"\s*\d+\s*")  # a piece that is only a number: the "1" of "1. No acute process."


def split_sentences(text: str) -> list[str]:
    """The pieces of `text` between sentence breaks (SENTENCE_BREAK), as they are: untrimmed, empty ones kept.

    A list number belongs to the sentence that follows it: numbered impressions ("1. No acute process. 2. Small
    effusion.", common in MIMIC-CXR and Open-i) give "1. No acute process" and " 2. Small effusion", never a
    piece "1" alone. Joining the pieces with "." gives `text` back."""
    pieces = []
    for piece in SENTENCE_BREAK.split(text):
        if pieces and LIST_NUMBER.fullmatch(pieces[-1]):
            pieces[-1] += "." + piece  # the break after a list number is not a sentence break
        else:
            pieces.append(piece)
    return pieces


def report_sentences(report: str) -> list[str]:
    """The valid sentences of a report (§5 steps 1-2): split at '.', strip, drop 'none' pieces and those without
    a letter (empty, or a stray list number such as the "3." ending a report)."""
    pieces = (" ".join(piece.split()) for piece in split_sentences(report))
    return [piece for piece in pieces if any(c.isalpha() for c in piece) and piece.lower() != "none"]


def report_to_caption(report: str, generator: torch.Generator | None = None, deterministic: bool = False) -> str:
    """Caption of a report (D6, docs/method.md §5): a shuffled random non-empty subset of its sentences.

    k is uniform in 1..n over the n valid sentences; the caption joins `sentence.lower() + ". "`. With
    deterministic=True (evaluation) it is all sentences in report order. No valid sentence -> "".
    """
    sentences = report_sentences(report)
    if sentences and not deterministic:
        order = torch.randperm(len(sentences), generator=generator).tolist()
        k = int(torch.randint(1, len(sentences) + 1, (), generator=generator))
        sentences = [sentences[i] for i in order[:k]]
    return "".join(sentence.lower() + ". " for sentence in sentences)


# Caption sources (train.py --captions; docs/alignment.md): which sentences of a report the captions are drawn from.
CAPTION_SOURCES = ("report", "impression", "positive")
# A sentence with one of these words states what is absent or normal (a NegEx-style cue list, kept short).
NEGATION_CUE = re.compile(r"\b(no|not|without|negative|normal|unremarkable|clear|intact|free)\b", re.IGNORECASE)
NO_FINDING_CAPTION = "No acute cardiopulmonary process."  # the positive-only report of a study with nothing positive


def positive_report(report: str) -> str:
    """The report's sentences without a negation cue (NEGATION_CUE), joined; NO_FINDING_CAPTION when none is left.
    "Small left pleural effusion. No pneumothorax." -> "Small left pleural effusion." """
    kept = [sentence for sentence in report_sentences(report) if not NEGATION_CUE.search(sentence)]
    return " ".join(sentence + "." for sentence in kept) or NO_FINDING_CAPTION


def caption_reports(reports: dict[str, str], source: str) -> dict[str, str]:
    """The reports captions are drawn from under a caption source: "report" and "impression" keep them as the
    dataset read them (the sections are chosen when reading), "positive" keeps only their positive sentences."""
    if source not in CAPTION_SOURCES:
        raise ValueError(f"caption source {source!r}: choose one of {', '.join(CAPTION_SOURCES)}")
    return {key: positive_report(text) for key, text in reports.items()} if source == "positive" else reports


_SECTION_HEADER = re.compile(r"^ *([A-Z][A-Z /&()-]*?) *:", re.MULTILINE)  # MIMIC style: " FINDINGS:"


def _as_sentences(text: str) -> str:
    text = " ".join(text.split())  # sections hold wrapped lines
    return text if not text or text.endswith(".") else text + "."  # keep the next section a new sentence


def parse_report_sections(text: str) -> dict[str, str]:
    """Sections of a MIMIC free-text report: lower-cased header -> text (the last one of each name wins, as
    in MIT-LCP create_section_files.py), plus "last_paragraph": the final paragraph, for reports without
    FINDINGS/IMPRESSION headers (older ones), unless it belongs to a context section such as COMPARISON."""
    headers = list(_SECTION_HEADER.finditer(text))
    sections = {}
    for header, following in zip(headers, headers[1:] + [None]):
        body = text[header.end():following.start() if following else len(text)]
        sections[header.group(1).lower()] = _as_sentences(body)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    last = paragraphs[-1] if paragraphs else ""
    header = _SECTION_HEADER.match(last)
    if header:
        last = "" if header.group(1).lower() in CONTEXT_SECTIONS else last[header.end():]
    sections["last_paragraph"] = "" if last == "FINAL REPORT" else _as_sentences(last)
    return sections


def compose_report(sections: dict[str, str], wanted=("findings", "impression")) -> str:
    """Report text from the wanted sections, in order; falls back to the last paragraph if all are empty."""
    parts = [_as_sentences(sections.get(name, "")) for name in wanted]
    if not any(parts):
        parts = [_as_sentences(sections.get("last_paragraph", ""))]
    return " ".join(part for part in parts if part)


# ----------------------------------------------------------------------------------------------------------
# Datasets

def read_csv(path, required=(), expected: str = ""):
    """Stream the rows of a .csv or .csv.gz as dicts keyed by the stripped header names. Rows whose cells are all
    empty are skipped; a byte-order mark is ignored. A missing file, a header without a `required` column or an
    unreadable file is a clear error naming the file and the expected header (`expected`, else `required`)."""
    path = Path(path)
    expected = expected or ",".join(required)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a CSV with header: {expected})")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in required if name not in header]
            if missing:
                raise ValueError(f"{path}: header {','.join(header) or '(empty file)'!r} lacks {missing}. "
                                 f"Expected header: {expected} (docs/datasets.md)")
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield dict(zip(header, row + [""] * (len(header) - len(row))))  # short rows: blanks
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:  # e.g. a truncated gzip
        raise ValueError(f"{path}: cannot be read as a CSV with columns {expected}: {error}") from None


def _find_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{root / name}(.gz) not found; expected the official MIMIC-CXR-JPG file there")


def check_root(root, what: str) -> Path:
    """The dataset folder `root` as a Path, or a clear error if it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} root {root} is not a folder; expected {what} in the layout of "
                                f"docs/datasets.md (for the synthetic world: `python -m world.synthetic --out {root}`)")
    return root


class ImageReportDataset(Dataset):
    """Image-report pairs: item -> dict(image=float (C, S, S), caption=str, image_id=str), or None when the
    image cannot be read (Collate drops it and counts it). augment=True: random caption (D6) and training
    augmentation; augment=False: the whole report in order and the plain image (evaluation).
    seed=None draws from torch's global RNG (DataLoader seeds each worker); an int makes item i of epoch e
    the same whatever the number of workers (call set_epoch before each epoch)."""

    def __init__(self, items, reports, image_size, in_chans, resize, augment, cache, seed):
        self.items = items  # [(image_id, image_path, report_key)]
        self.reports = reports  # report_key -> report text
        self.image_size, self.in_chans, self.resize = image_size, in_chans, resize
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.cache_dir, self.cache_rows, self._cache_arrays = None, None, None  # arrays: opened lazily per process
        if cache is not None:
            self._index_cache(Path(cache))
        self._check_images_exist()

    def _check_images_exist(self):
        """Count the image files that are missing (and not cached): they are skipped when read. If no image is
        there at all, stop now with a clear error instead of training on nothing."""
        cached = set()
        if self.cache_rows is not None:
            status = np.load(self.cache_dir / "status.npy")
            cached = {i for i, row in enumerate(self.cache_rows) if row >= 0 and status[row] == CACHED}
        self.cached_images = len(cached)
        self.missing_images = sum(1 for i, (_, path, _) in enumerate(self.items)
                                  if i not in cached and not os.path.exists(path))
        if self.items and self.missing_images == len(self.items):
            example = self.items[0][1]
            raise FileNotFoundError(f"none of the {len(self.items)} images of this selection exists (e.g. {example}); "
                                    f"check --root and the image folders (docs/datasets.md)")
        if self.missing_images:
            print(f"{self.missing_images} of {len(self.items)} image files are missing: they will be skipped")

    def __len__(self):
        return len(self.items)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def report_texts(self) -> list[str]:
        """Deterministic captions of every report of the selection, e.g. to train the tokenizer (D7)."""
        keys = dict.fromkeys(key for _, _, key in self.items)
        return [report_to_caption(self.reports[key], deterministic=True) for key in keys]

    def __getitem__(self, index):
        image_id, path, key = self.items[index]
        # hash of a tuple of ints: the same in every process (only str hashes are salted)
        generator = None if self.seed is None else torch.Generator().manual_seed(
            hash((self.seed, self.epoch, index)) % 2**63)
        try:
            pixels = self._square_pixels(index)  # uint8 (S, S)
        except (OSError, SyntaxError, ValueError) as error:  # missing, truncated or not an image
            print(f"skipping {path}: cannot read the image ({error})", file=sys.stderr)
            return None
        if self.augment:
            pixels = augment_image(pixels, generator)
        caption = report_to_caption(self.reports[key], generator, deterministic=not self.augment)
        return {"image": to_model_input(pixels, self.in_chans), "caption": caption, "image_id": image_id}

    def _square_pixels(self, index) -> np.ndarray:
        row = self.cache_rows[index] if self.cache_rows else -1
        if row >= 0:
            if self._cache_arrays is None:
                self._cache_arrays = (np.load(self.cache_dir / "images.npy", mmap_mode="r"),
                                      np.load(self.cache_dir / "status.npy", mmap_mode="r"))
            images, status = self._cache_arrays
            if status[row] == CACHED:
                return np.array(images[row])  # a copy: the memory map stays read-only
        with Image.open(self.items[index][1]) as image:
            return resize_to_square(image, self.image_size, self.resize)

    def __getstate__(self):  # a pickled memory map would copy the whole cache into each worker
        return {**self.__dict__, "_cache_arrays": None}

    def _index_cache(self, cache: Path):
        if not cache.exists():
            print(f"no image cache at {cache}: reading the image files (build one with `python data.py cache`)")
            return
        if not (cache / "meta.json").exists():
            raise ValueError(f"{cache} is not an image cache (no meta.json); delete it or run `python data.py cache`")
        meta = read_json(cache / "meta.json")
        if (meta["size"], meta["resize"]) != (self.image_size, self.resize):
            raise ValueError(f"cache {cache} holds {meta['size']}-pixel {meta['resize']} images, but this dataset "
                             f"wants {self.image_size}-pixel {self.resize} ones; build a matching cache with "
                             f"`python data.py cache --size {self.image_size} --resize {self.resize}`")
        row_of = {image_id: row for row, image_id in enumerate((cache / "ids.txt").read_text().split("\n"))}
        self.cache_dir, self.cache_rows = cache, [row_of.get(image_id, -1) for image_id, _, _ in self.items]
        done = int((np.load(cache / "status.npy")[[r for r in self.cache_rows if r >= 0]] == CACHED).sum())
        if done < len(self.items):
            print(f"cache {cache}: {done} of {len(self.items)} images cached; the rest are read from their files")


def read_report(path: Path) -> tuple[str, bool]:
    """The text of a report file and whether it was not UTF-8: such files are decoded as Latin-1 (every byte is a
    character there, so nothing is replaced or lost; MIMIC's reports are ASCII, edited copies sometimes are not)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


def _mimic_reports(root: Path, studies, report_source, sections) -> tuple[dict[str, str], int, int]:
    """study_id -> report text for the (subject_id, study_id) pairs, how many had no report at all, and how
    many report files were decoded as Latin-1."""
    reports, latin1 = {}, 0
    if report_source == "txt":
        for subject, study in studies:
            path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            if path.exists():
                text, not_utf8 = read_report(path)
                latin1 += not_utf8
                reports[study] = compose_report(parse_report_sections(text), sections)
    else:
        source = Path(report_source)
        if not source.exists():
            raise FileNotFoundError(f"report_source {source} does not exist; expected 'txt' or the path of "
                                    f"mimic_cxr_sectioned.csv (MIT-LCP create_section_files.py)")
        wanted = {study for _, study in studies}
        for row in read_csv(source, SECTIONED_COLUMNS):
            if row["study"][1:] in wanted:  # "s59999991" -> "59999991"
                reports[row["study"][1:]] = compose_report(row, sections)
    return reports, len(studies) - len(reports), latin1


class MimicCXR(ImageReportDataset):
    """MIMIC-CXR-JPG v2 (docs/datasets.md §1): one item per image of the chosen split and views.

    root holds mimic-cxr-2.0.0-{metadata,split}.csv(.gz) and files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg.
    report_source: "txt" reads files/pXX/pXXXXXXXX/sXXXXXXXX.txt (unzip mimic-cxr-reports.zip into root), or
    a path to MIT-LCP's mimic_cxr_sectioned.csv. The report is the `sections` joined; without any of them,
    the last paragraph. Studies with an empty or missing report are
    skipped and counted in `self.skipped`. split=None keeps every split (the image cache uses that).
    """

    def __init__(self, root, split: str | None = "train", image_size: int = 224, in_chans: int = 3,
                 report_source: str = "txt", sections=("findings", "impression"), views=FRONTAL_VIEWS,
                 augment: bool | None = None, cache=None, seed: int | None = None, resize: str = "letterbox"):
        root = check_root(root, "MIMIC-CXR-JPG")
        if split not in ("train", "validate", "test", None):
            raise ValueError(f"split must be 'train', 'validate', 'test' or None, got {split!r}")
        if unknown := set(sections) - set(REPORT_SECTIONS):
            raise ValueError(f"unknown report sections {sorted(unknown)}; choose from {REPORT_SECTIONS}")
        split_of = {row["dicom_id"]: row["split"]
                    for row in read_csv(_find_file(root, "mimic-cxr-2.0.0-split.csv"), SPLIT_COLUMNS)}
        rows = [row for row in read_csv(_find_file(root, "mimic-cxr-2.0.0-metadata.csv"), METADATA_COLUMNS)]
        unlisted = sum(row["dicom_id"] not in split_of for row in rows)  # no split row: in no split
        in_split = [row for row in rows if split is None or split_of.get(row["dicom_id"]) == split]
        images = [(row["dicom_id"], row["subject_id"], row["study_id"]) for row in in_split
                  if row["ViewPosition"] in views]
        studies = dict.fromkeys((subject, study) for _, subject, study in images)
        reports, no_report, latin1 = _mimic_reports(root, studies, report_source, sections)
        reports = {study: text for study, text in reports.items() if report_sentences(text)}
        empty = len(studies) - no_report - len(reports)
        items = [(dicom, str(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"),
                  study) for dicom, subject, study in images if study in reports]
        self.skipped = {"empty_report": empty, "no_report": no_report, "no_split_row": unlisted if split else 0}
        print(f"MimicCXR({split}): {len(items)} images; views {'/'.join(views)} kept {len(images)} of the split's "
              f"{len(in_split)}; skipped {empty} studies with an empty report and {no_report} without a report "
              f"({report_source})"
              + (f"; {unlisted} images have no row in the split file (in no split)" if unlisted and split else "")
              + (f"; {latin1} report files were not UTF-8 and were read as Latin-1" if latin1 else ""))
        super().__init__(items, reports, image_size, in_chans, resize,
                         split == "train" if augment is None else augment, cache, seed)


class OpenI(ImageReportDataset):
    """Indiana University chest X-rays (NLMCXR, docs/datasets.md §7): one item per <parentImage> of a report.

    root holds ecgen-radiology/<n>.xml (NLMCXR_reports.tgz) and the PNGs named <parentImage id>.png
    (NLMCXR_png.tgz unpacks them flat; images_dir, relative to root). The XML has no view: pass views_csv,
    torchxrayvision's nlmcxr_tsne_pa.csv(.gz) (imageid,tsne-view), to keep the PA images only; without it
    every image is kept, laterals included. Reports whose sections are empty are skipped and counted.
    """

    def __init__(self, root, image_size: int = 224, in_chans: int = 3, sections=("findings", "impression"),
                 views_csv=None, images_dir: str = ".", augment: bool = False, cache=None, seed: int | None = None,
                 resize: str = "letterbox"):
        root = check_root(root, "Open-i")
        xml_files = sorted((root / "ecgen-radiology").glob("*.xml"))
        if not xml_files:
            raise FileNotFoundError(f"no report XML in {root / 'ecgen-radiology'}; unpack NLMCXR_reports.tgz there")
        frontal = None
        if views_csv:
            frontal = {row["imageid"] for row in read_csv(Path(views_csv), ("imageid", "tsne-view"))
                       if row["tsne-view"] == "PA"}
        items, reports, empty, unreadable, listed = [], {}, 0, 0, 0  # listed: images of the non-empty reports
        for xml_file in xml_files:
            try:
                tree = ET.parse(xml_file)
            except ET.ParseError as error:
                print(f"skipping {xml_file}: not a valid report XML ({error})", file=sys.stderr)
                unreadable += 1
                continue
            texts = {node.get("Label", "").lower(): "".join(node.itertext())
                     for node in tree.iter("AbstractText")}
            report = compose_report(texts, sections)
            if not report_sentences(report):
                empty += 1
                continue
            reports[xml_file.stem] = report
            for node in tree.iter("parentImage"):
                listed += 1
                if frontal is None or node.get("id") in frontal:
                    items.append((node.get("id"), str(root / images_dir / f"{node.get('id')}.png"), xml_file.stem))
        if frontal is not None and listed and not items:
            raise ValueError(f"{views_csv} names none of the {listed} images of the reports as PA; expected "
                             f"torchxrayvision's nlmcxr_tsne_pa.csv(.gz) (imageid,tsne-view)")
        self.skipped = {"empty_report": empty, "unreadable_xml": unreadable}
        views = (f"the views file kept {len(items)} PA of {listed}" if frontal is not None else
                 "all views, laterals included: pass nlmcxr_tsne_pa.csv.gz to keep PA only")
        print(f"OpenI: {len(items)} images of {len(reports)} reports ({views}); skipped {empty} empty reports and "
              f"{unreadable} unreadable XML files")
        super().__init__(items, reports, image_size, in_chans, resize, augment, cache, seed)


class Collate:
    """Batches items: drops None (unreadable images), stacks images, tokenizes captions with dynamic padding (§4).

    Returns dict(images (B, C, S, S), input_ids (B, T), attention_mask (B, T), captions, skipped = items
    dropped); if every item was dropped, images, input_ids and attention_mask are None (the training step
    counts the batch as skipped and moves on). A class, so workers can pickle it."""

    def __init__(self, tokenizer, max_len: int = 100):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items):
        kept = [item for item in items if item is not None]
        if not kept:
            return {"images": None, "input_ids": None, "attention_mask": None, "captions": [], "skipped": len(items)}
        captions = [item["caption"] for item in kept]
        # default_collate stacks straight into shared memory inside a worker: one copy less per batch
        return {"images": default_collate([item["image"] for item in kept]),  # (B, C, S, S)
                **encode_texts(self.tokenizer, captions, self.max_len), "captions": captions,
                "skipped": len(items) - len(kept)}


# ----------------------------------------------------------------------------------------------------------
# Image cache

PENDING, CACHED, UNREADABLE = 0, 1, 2  # status.npy values


def cache_is_complete(folder) -> bool:
    """Whether `folder` holds an image cache that build_cache has finished (every row done)."""
    folder = Path(folder)
    if not (folder / "meta.json").exists() or not (folder / "progress.json").exists():
        return False
    done = json.loads((folder / "progress.json").read_text())["done"]
    return done == json.loads((folder / "meta.json").read_text())["count"]


def training_workers(dataset: ImageReportDataset) -> int:
    """DataLoader workers for training on `dataset`: none when every image is in the cache, else 2 to decode the
    image files. A cached image is a memory-mapped row, so what is left (augmenting, normalising, tokenizing) runs
    in the training process between steps; worker processes would take the same CPU time from the compute threads
    on the same cores, interrupt them, and add a copy of every batch between processes (docs/speed.md)."""
    return 0 if len(dataset) and dataset.cached_images == len(dataset) else 2


def _load_chunk(rows: list[int], paths: list[str], size: int, resize: str) -> list:
    """[(row, uint8 (size, size) or None if unreadable)]; runs in a DataLoader worker as its collate_fn."""
    chunk = []
    for row in rows:
        try:
            with Image.open(paths[row]) as image:
                chunk.append((row, resize_to_square(image, size, resize)))
        except (OSError, SyntaxError, ValueError) as error:
            print(f"cache: skipping {paths[row]} ({error})", file=sys.stderr)
            chunk.append((row, None))
    return chunk


def save_array(path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save given a name would add ".npy" to it
        np.save(handle, array)


def create_image_store(path: Path, shape: tuple) -> None:
    """A uint8 .npy of `shape` whose disk blocks are allocated now (a plain memory map would be a sparse file)."""
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        with open(path, "r+b") as store:
            os.posix_fallocate(store.fileno(), 0, os.path.getsize(path))
    except OSError as error:
        raise WriteError.of(path, error) from None


def build_cache(dataset: ImageReportDataset, out, chunk_size: int = 256, workers: int = 0) -> Path:
    """Resize each image of `dataset` once, at its image_size and resize mode, into `out`; resumable, memory
    bounded by a few chunks.

    Files: ids.txt (image ids, row order), images.npy (uint8 (N, S, S) memory map), status.npy (per row:
    0 pending, 1 cached, 2 unreadable), meta.json (written last at creation: the store is complete), and
    progress.json (rows done; replaced atomically after each chunk is flushed, so an interruption at any point
    loses at most the chunk in flight and re-running continues from it). images.npy's disk space is reserved at
    creation, so a full disk is a clear error then, not a crash (SIGBUS) when the memory map is written.
    """
    out, size, resize = Path(out), dataset.image_size, dataset.resize
    ids = [image_id for image_id, _, _ in dataset.items]
    if not ids:
        raise ValueError(f"nothing to cache for {out}: the dataset selected no images")
    meta = {"size": size, "resize": resize, "count": len(ids)}
    if (out / "meta.json").exists():
        if read_json(out / "meta.json") != meta or (out / "ids.txt").read_text().split("\n") != ids:
            raise ValueError(f"{out} holds a cache of other images or another size; delete it or choose --out")
        done = read_json(out / "progress.json")["done"] if (out / "progress.json").exists() else 0
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "ids.txt", lambda temp: Path(temp).write_text("\n".join(ids)))
        create_image_store(out / "images.npy", (len(ids), size, size))
        write_atomic(out / "status.npy", lambda temp: save_array(temp, np.full(len(ids), PENDING, dtype=np.uint8)))
        write_atomic(out / "meta.json", lambda temp: Path(temp).write_text(json.dumps(meta)))
        done = 0
    images = np.load(out / "images.npy", mmap_mode="r+")
    status = np.load(out / "status.npy", mmap_mode="r+")
    paths = [path for _, path, _ in dataset.items]
    loader = DataLoader(range(done, len(ids)), batch_size=chunk_size, num_workers=workers,
                        collate_fn=functools.partial(_load_chunk, paths=paths, size=size, resize=resize))
    with Progress(len(ids), f"cache {out}", initial=done, unit="img") as progress:
        for chunk in loader:
            for index, pixels in chunk:
                if pixels is not None:
                    images[index] = pixels
                status[index] = UNREADABLE if pixels is None else CACHED
            try:
                images.flush()
                status.flush()
            except OSError as error:
                raise WriteError.of(out / "images.npy", error) from None
            done = chunk[-1][0] + 1
            write_atomic(out / "progress.json", lambda temp: Path(temp).write_text(json.dumps({"done": done})))
            progress.update(len(chunk))
    bad = int((status == UNREADABLE).sum())
    print(f"cache {out}: {len(ids) - bad} images cached, {bad} unreadable (skipped when training)")
    return out


@dataclasses.dataclass
class CacheConfig:
    data: str = option("mimic", "dataset layout", choices=("mimic", "openi"))
    root: str = option("data/synthetic", "dataset root folder")
    size: int = option(128, "side S of the cached square images: the model's training input (tiny 128, the default "
                            "run's; base 448), both with the super-resolution target", minimum=8)
    out: str = option("", "cache folder; empty = <root>/cache-<size>, which train.py finds by itself")
    resize: str = option("letterbox", "letterbox (pad) or crop", choices=RESIZE_MODES)
    chunk_size: int = option(256, "images per flushed chunk", minimum=1)
    workers: int = option(2, "image decoding processes", minimum=0)
    progress_interval: float = progress_interval_option()

    def __post_init__(self):
        check_options(self)


def cache_command(config: CacheConfig) -> None:
    if config.data == "mimic":
        dataset = MimicCXR(config.root, split=None, image_size=config.size, resize=config.resize)
    else:
        dataset = OpenI(config.root, image_size=config.size, resize=config.resize)
    out = config.out or Path(config.root) / f"cache-{config.size}"
    with OutDirLock(out, "cache folder (pass --out to put it elsewhere)"), lines_every(config.progress_interval):
        build_cache(dataset, out, config.chunk_size, config.workers)


def main(argv=None) -> int:
    return run_script(CacheConfig, cache_command, argv, "Resize every image of a dataset once into a uint8 memory map "
                      "that training reads (resumable: re-run to continue).", commands=["cache"])


if __name__ == "__main__":
    sys.exit(main())
