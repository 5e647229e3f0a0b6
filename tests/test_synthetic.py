"""The synthetic world (synthetic.py, D13): real MIMIC-CXR-JPG layout and formats (docs/datasets.md §1, §6),
labels that agree with the reports and the images, patient-disjoint splits, determinism by seed."""
import csv
import gzip
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from world import synthetic
from world.phantom import render_image
from world.synthetic import Finding, Study, generate, label_report, sample_study

SIZE = 64
# Written out here from docs/datasets.md rather than imported, so that a drifting constant fails the test.
METADATA_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                   "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                   "PatientOrientationCodeSequence_CodeMeaning")
SPLIT_HEADER = "dicom_id,study_id,subject_id,split"
CHEXPERT_HEADER = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                   "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,"
                   "Support Devices")
MS_CXR_HEADER = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
# Independent keyword check of the labels: the word(s) a report uses for each CheXpert column we generate.
KEYWORDS = {"Pleural Effusion": r"effusion", "Pneumothorax": r"pneumothorax", "Edema": r"edema",
            "Atelectasis": r"atelectasis", "Consolidation": r"consolidation", "Lung Lesion": r"nodul|\bmass",
            "Cardiomegaly": r"cardiomegaly|\bheart\b|\bcardiac\b"}
NEGATION = r"\b(no|normal|unremarkable|clear)\b"
UNCERTAINTY = r"\b(possible|possibly|may|could|borderline|cannot be excluded)\b"


def read_csv(path):
    data = gzip.open(path, "rt").read() if str(path).endswith(".gz") else open(path).read()
    lines = data.split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"
    return lines[0], list(csv.DictReader(io.StringIO(data)))


def report_body(text):
    """FINDINGS + IMPRESSION text, lower-cased, as sentences ('.' between two digits is not a break)."""
    body = re.sub(r"\s+", " ", text.split("FINDINGS:")[1].replace("IMPRESSION:", " ")).lower()
    return [s for s in re.split(r"(?<!\d)\.|\.(?!\d)", body) if s.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "synthetic"
    summary = generate(root, studies=60, seed=3, image_size=SIZE, workers=1, verbose=False)
    return root, summary


def test_metadata_rows_follow_the_mimic_path_formula_and_id_formats(world):
    root, summary = world
    header, rows = read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert header == METADATA_HEADER and len(rows) == summary["studies"] == 60
    for row in rows:
        sid, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        assert DICOM_ID.match(dicom) and len(dicom) == 44
        assert re.fullmatch(r"1\d{7}", sid) and re.fullmatch(r"5\d{7}", study)
        assert (root / f"files/p{sid[:2]}/p{sid}/s{study}/{dicom}.jpg").is_file()
        assert (root / f"files/p{sid[:2]}/p{sid}/s{study}.txt").is_file()  # report: sibling of the study folder
        assert row["ViewPosition"] in ("PA", "AP") and row["Rows"] == row["Columns"] == str(SIZE)
        assert re.fullmatch(r"21\d{6}", row["StudyDate"])
        assert re.fullmatch(r"([1-9]\d*|0)\.\d{3}", row["StudyTime"])  # HHMMSS.fff with leading zeros dropped
    assert len({r["dicom_id"] for r in rows}) == len({r["study_id"] for r in rows}) == 60


def test_split_and_chexpert_files_have_the_real_headers_and_value_formats(world):
    root, _ = world
    header, splits = read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    assert header == SPLIT_HEADER and {r["split"] for r in splits} == {"train", "validate", "test"}
    header, labels = read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert header == CHEXPERT_HEADER and len(labels) == 60
    values = {v for row in labels for k, v in row.items() if k not in ("subject_id", "study_id")}
    assert values <= {"1.0", "0.0", "-1.0", ""} and {"1.0", "0.0", ""} <= values
    assert all(re.fullmatch(r"\d{8}", row["study_id"]) for row in labels)  # no "s" prefix here
    assert read_csv(root / "MS_CXR_Local_Alignment_v1.0.0.csv")[0] == MS_CXR_HEADER


def test_split_is_by_patient_and_some_patients_have_several_studies(world):
    root, summary = world
    _, splits = read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    split_of, studies_of = {}, {}
    for row in splits:
        split_of.setdefault(row["subject_id"], set()).add(row["split"])
        studies_of.setdefault(row["subject_id"], set()).add(row["study_id"])
    assert all(len(s) == 1 for s in split_of.values())
    assert max(len(s) for s in studies_of.values()) >= 2
    assert summary["splits"] == {s: sum(r["split"] == s for r in splits) for s in ("train", "validate", "test")}


def test_reports_use_the_mimic_layout(world):
    root, _ = world
    for path in (root / "files").rglob("*.txt"):
        text = path.read_text(encoding="ascii")
        lines = text.rstrip("\n").split("\n")
        assert lines[0].strip() == "FINAL REPORT" and lines[0].startswith("   ")
        assert all(line.startswith(" ") for line in lines[1:]) and max(map(len, lines)) <= 79
        for section in ("EXAMINATION:", "INDICATION:", "COMPARISON:", "FINDINGS:", "IMPRESSION:"):
            assert f" {section}" in text


def test_chexpert_labels_agree_with_report_text_and_true_findings(world):
    root, _ = world
    _, labels = read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _, truth = read_csv(root / "synthetic-labels.csv")
    truth = {row["study_id"]: row for row in truth}
    seen = set()
    for row in labels:
        sid = row["subject_id"]
        sentences = report_body((root / f"files/p{sid[:2]}/p{sid}/s{row['study_id']}.txt").read_text())
        for column, keyword in KEYWORDS.items():
            mentions = [s for s in sentences if re.search(keyword, s)]
            value = row[column]
            seen.add(value)
            if value == "":
                assert not mentions, (column, mentions)
            elif value == "0.0":
                assert mentions and all(re.search(NEGATION, s) for s in mentions), (column, mentions)
            elif value == "-1.0":
                assert any(re.search(UNCERTAINTY, s) for s in mentions), (column, mentions)
                assert not any(re.search(NEGATION, s) for s in mentions), (column, mentions)
            else:
                assert any(not re.search(NEGATION, s) for s in mentions), (column, mentions)
        names = [n for n, c in synthetic.FINDING_TO_CHEXPERT.items() if truth[row["study_id"]][n] == "1"]
        for name, column in synthetic.FINDING_TO_CHEXPERT.items():
            present = any(synthetic.FINDING_TO_CHEXPERT[n] == column for n in names)
            assert row[column] in (("1.0", "-1.0") if present else ("0.0", "")), (name, row[column])
        assert (row["No Finding"] == "1.0") == (not names)
    assert seen == {"1.0", "0.0", "-1.0", ""}


def test_label_report_on_hand_written_report():
    text = (" FINDINGS: \n Small left pleural effusion.  No pneumothorax.  Heart size is normal.  Patchy opacity in\n"
            " the right lower lobe, concerning for pneumonia.  A 1.5 cm nodule in the left upper lung.\n"
            " IMPRESSION: \n Possible mild pulmonary edema.\n")
    labels = label_report(text)
    expected = {"Pleural Effusion": "1.0", "Pneumothorax": "0.0", "Cardiomegaly": "0.0", "Lung Opacity": "1.0",
                "Pneumonia": "-1.0", "Lung Lesion": "1.0", "Edema": "-1.0", "No Finding": "", "Atelectasis": ""}
    assert {k: labels[k] for k in expected} == expected
    assert label_report(" FINDINGS: The lungs are clear.  No pleural effusion.\n")["No Finding"] == "1.0"


def test_grounding_boxes_are_inside_the_image_on_the_stated_side(world):
    root, _ = world
    _, rows = read_csv(root / "MS_CXR_Local_Alignment_v1.0.0.csv")
    _, splits = read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    split_of = {r["dicom_id"]: r["split"] for r in splits}
    assert rows, "the test split should have grounding rows"
    for row in rows:
        x, y, w, h, width, height = (int(row[k]) for k in ("x", "y", "w", "h", "image_width", "image_height"))
        assert width == height == SIZE and w >= 1 and h >= 1
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        assert split_of[row["dicom_id"]] == "test" and row["path"].endswith(row["dicom_id"] + ".jpg")
        assert (root / row["path"]).is_file() and row["path"].startswith("files/p")
        text = row["label_text"].lower().replace("lingula", "left")
        centre = x + w / 2
        if "bilateral" in text or "both" in text or "bibasilar" in text or "edema" in text:
            same = [r for r in rows if (r["dicom_id"], r["label_text"]) == (row["dicom_id"], row["label_text"])]
            assert len(same) == 2  # one box per side
        elif re.search(r"\bright\b", text):
            assert centre < width / 2, row  # the patient's right is on the image left
        elif re.search(r"\bleft\b", text):
            assert centre > width / 2, row


def test_images_are_8bit_grayscale_of_the_requested_size(world):
    root, _ = world
    paths = sorted((root / "files").rglob("*.jpg"))
    assert len(paths) == 60
    for path in paths[:10]:
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (SIZE, SIZE) and image.format == "JPEG"


def test_same_seed_gives_identical_files_whatever_the_worker_count(world, tmp_path):
    root, _ = world
    again = tmp_path / "again"
    generate(again, studies=60, seed=3, image_size=SIZE, workers=2, verbose=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_different_seed_gives_a_different_world(world, tmp_path):
    root, _ = world
    other = tmp_path / "other"
    generate(other, studies=5, seed=4, image_size=SIZE, workers=1, verbose=False)
    ids = {row["dicom_id"] for row in read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")[1]}
    assert not ids & {row["dicom_id"] for row in read_csv(other / "mimic-cxr-2.0.0-metadata.csv.gz")[1]}
    study = _phantom([])
    first, _ = render_image(study, SIZE)
    study.seed += 1
    assert np.abs(first.astype(float) - render_image(study, SIZE)[0]).mean() > 5  # another patient's anatomy


def _phantom(findings):
    return Study(10000001, 50000001, "0" * 8 + "-00000000" * 4, "test", "PA", seed=11, findings=findings)


@pytest.mark.parametrize("finding", [Finding("pleural effusion", "right", severity=0),
                                     Finding("nodule", "left", "upper", size_cm=1.0),
                                     Finding("consolidation", "right", "lower", severity=0),
                                     Finding("atelectasis", "left", severity=0)])
def test_an_opacity_brightens_its_box_and_leaves_the_other_side_unchanged(finding):
    with_finding, boxes = render_image(_phantom([finding]), 128)
    without, _ = render_image(_phantom([]), 128)
    assert boxes and all(index == 0 for index, _, _ in boxes)
    for _, side, (x, y, w, h) in boxes:
        assert side == finding.side and ((x + w / 2 < 64) == (side == "right"))
        crop = (slice(y, y + h), slice(x, x + w))
        assert with_finding[crop].astype(float).mean() - without[crop].mean() > 8  # gray levels, of 255
    other_half = (slice(None), slice(64, 128) if finding.side == "right" else slice(0, 64))
    assert np.abs(with_finding[other_half].astype(float) - without[other_half]).mean() < 0.5  # the rest unchanged


@pytest.mark.parametrize("side", ["right", "left"])
def test_pneumothorax_darkens_a_rim_along_the_lateral_chest_wall(side):
    with_finding, boxes = render_image(_phantom([Finding("pneumothorax", side, severity=1)]), 128)
    without, _ = render_image(_phantom([]), 128)
    (_, _, (x, y, w, h)), = boxes
    darker = (with_finding[y:y + h, x:x + w].astype(float) - without[y:y + h, x:x + w]) < -8
    assert darker.mean() > 0.05
    lateral_fraction = np.nonzero(darker)[1].mean() / w  # 0 = the box's image-left edge
    assert lateral_fraction < 0.4 if side == "right" else lateral_fraction > 0.6


def test_cardiomegaly_box_is_wider_than_half_the_thorax():
    _, boxes = render_image(_phantom([Finding("cardiomegaly", severity=1)]), 256)
    (_, _, (_, _, width, _)), = boxes
    assert width > 0.5 * 0.8 * 256  # the thorax spans about 80% of the image width


def test_render_works_at_448_pixels():
    image, boxes = render_image(_phantom([Finding("mass", "left", "middle", size_cm=4.0)]), 448)
    assert image.shape == (448, 448) and image.dtype == np.uint8
    (_, _, (x, y, w, h)), = boxes
    assert x > 224 and 20 < w < 80 and 20 < h < 80  # 4 cm is ~0.1 body units, ~40 px at 448


def test_prevalence_is_sensible_for_zero_shot_evaluation():
    studies = [sample_study(0, i, 10000001, 50000001, "x", "train") for i in range(1500)]
    assert 0.28 < np.mean([not s.findings for s in studies]) < 0.42
    for name in synthetic.FINDINGS:
        assert 0.05 < np.mean([any(f.name == name for f in s.findings) for s in studies]) < 0.25, name


def test_bad_out_path_gives_a_clear_error(world, tmp_path, capsys):
    root, _ = world
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        generate(a_file, studies=2, seed=0, image_size=SIZE, workers=1, verbose=False)
    with pytest.raises(ValueError, match="not empty"):
        generate(root, studies=2, seed=0, image_size=SIZE, workers=1, verbose=False)
    assert synthetic.main(["--out", str(a_file), "--studies", "2"]) == 2
    assert "existing file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["a_file"]  # nothing half-written left behind
