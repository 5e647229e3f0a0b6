"""Tests of data.py on tiny fixtures built in tmp_path in the exact real formats (docs/datasets.md §1, §7, §9)."""
import csv
import gzip
import json
import pickle
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from util.tokenizer import train_tokenizer

METADATA_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                   "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                   "PatientOrientationCodeSequence_CodeMeaning")
SPEC_EXAMPLE = "Heart size is normal. Nodule measures 1.5 cm. None."

NORMAL_FINDINGS = ("The lungs are clear without focal consolidation.  No pleural effusion or pneumothorax is "
                   "seen.  The cardiomediastinal silhouette is within normal limits.")
# (subject, study, split, [(view, width, height)], findings, impression, old-style body without headers)
STUDIES = [
    ("19999991", "59999991", "train", [("PA", 24, 30), ("LATERAL", 24, 30)], NORMAL_FINDINGS,
     "No acute cardiopulmonary process.", None),
    ("19999991", "59999992", "train", [("AP", 30, 25)], None,
     "1. Mild pulmonary edema.\n2. Small left pleural effusion measuring 1.5 cm.", None),
    ("19999992", "59999993", "validate", [("PA", 24, 30)], "Heart size is normal.", "No pneumothorax.", None),
    ("19999993", "59999994", "test", [("PA", 24, 30), ("AP", 24, 30)], None, "Right lower lobe pneumonia.", None),
    ("19999994", "59999995", "train", [("PA", 24, 30)], None, None, None),  # empty report: skipped
    ("19999995", "59999996", "train", [("PA", 24, 30)], None, None,
     "Lungs are hyperinflated.  There is no focal consolidation."),
]


def dicom_id(number: int) -> str:
    return "-".join(f"{(number * 2654435761 + group * 40503) % 16**8:08x}" for group in range(5))


def mimic_report(findings, impression, body) -> str:
    """A report .txt in the MIMIC layout (docs/datasets.md §1.6): centred title, lines start with a space."""
    lines = [" " * 33 + "FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             " INDICATION:  ___F with cough and fever  // eval for pneumonia", " ", " COMPARISON:  None.", " "]
    for header, text in (("FINDINGS", findings), ("IMPRESSION", impression), (None, body)):
        if text:
            lines += [f" {header}: ", " "] if header else []
            for paragraph in text.split("\n"):
                lines += [" " + line for line in textwrap.wrap(paragraph, 77)]
            lines.append(" ")
    return "\n".join(lines) + "\n"


def write_csv_gz(path, header: str, rows):
    with gzip.open(path, "wt", newline="") as file:
        file.write(header + "\n")
        csv.writer(file, lineterminator="\n").writerows(rows)


def jpeg(path, width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path, quality=95)


def make_mimic(root):
    """MIMIC-CXR-JPG (+ reports) fixture; returns the path of its mimic_cxr_sectioned.csv."""
    metadata, split, sectioned, number = [], [], [], 0
    for subject, study, split_name, images, findings, impression, body in STUDIES:
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for view, width, height in images:
            number += 1
            image_id = dicom_id(number)
            orientation = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
            metadata.append([image_id, subject, study, "CHEST (PA AND LAT)", view, height, width, "21800506",
                             "213014.531", "CHEST (PA AND LAT)", orientation, "Erect"])
            split.append([image_id, study, subject, split_name])
            jpeg(study_dir / f"{image_id}.jpg", width, height, number)
        study_dir.with_suffix(".txt").write_text(mimic_report(findings, impression, body))
        sectioned.append([f"s{study}", impression and impression.replace("\n", "\n "),
                          findings and findings.replace(" or pneumothorax", " or\n pneumothorax"), body, "None."])
    write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_HEADER, metadata)
    write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split", split)
    with open(root / "mimic_cxr_sectioned.csv", "w", newline="") as file:  # csv.writer, as MIT-LCP's script
        writer = csv.writer(file)
        writer.writerow(["study", "impression", "findings", "last_paragraph", "comparison"])
        writer.writerows(sectioned)  # None -> empty field
    return root / "mimic_cxr_sectioned.csv"


@pytest.fixture
def mimic(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    root.mkdir()
    return root, make_mimic(root)


OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{uid}"/>
   <pmcId id="{uid}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{uid}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            {findings}
            {impression}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      <major>normal</major>
   </MeSH>
   {images}
</eCitation>
"""


def make_openi(root):
    """Open-i fixture: ecgen-radiology/<n>.xml, flat PNGs named by parentImage id, torchxrayvision view CSV."""
    reports = {  # uid: (findings, impression, image ids)
        1: ("The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema.",
            "Normal chest x-XXXX.", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
        2: (None, "No acute disease.", ["CXR2_IM-0652-1001"]),
        3: (None, None, ["CXR3_IM-1384-1001"]),  # both sections empty: skipped
        4: ("Heart size normal.", "No acute process.", []),  # a report without images
    }
    (root / "ecgen-radiology").mkdir(parents=True)
    for uid, (findings, impression, image_ids) in reports.items():
        def section(label, text):
            return f'<AbstractText Label="{label}">{text}</AbstractText>' if text else f'<AbstractText Label="{label}"/>'
        images = "\n   ".join(f'<parentImage id="{image_id}">\n      <figureId>F1</figureId>\n      <caption>Xray '
                               f'Chest PA and Lateral</caption>\n      <panel type="single">\n         <url>/hadoop/'
                               f'storage/radiology/extract/{image_id}.jpg</url>\n      </panel>\n   </parentImage>'
                               for image_id in image_ids)
        (root / "ecgen-radiology" / f"{uid}.xml").write_text(OPENI_XML.format(
            uid=uid, findings=section("FINDINGS", findings), impression=section("IMPRESSION", impression),
            images=images))
        for number, image_id in enumerate(image_ids):
            Image.fromarray(np.full((20, 16), 40 * (uid + number), np.uint8)).save(root / f"{image_id}.png")
    write_csv_gz(root / "nlmcxr_tsne_pa.csv.gz", "imageid,tsne-view",
                 [["CXR1_1_IM-0001-3001", "PA"], ["CXR1_1_IM-0001-4001", "L"], ["CXR2_IM-0652-1001", "PA"]])


# ---------------------------------------------------------------------------------------------------------
# Report captions (D6)

def test_documented_example_gives_exactly_its_four_captions():
    generator = torch.Generator().manual_seed(0)
    captions = {data.report_to_caption(SPEC_EXAMPLE, generator) for _ in range(200)}
    assert captions == {"heart size is normal. ", "nodule measures 1.5 cm. ",
                        "heart size is normal. nodule measures 1.5 cm. ",
                        "nodule measures 1.5 cm. heart size is normal. "}


def test_decimals_stay_inside_sentences_and_none_and_empty_pieces_are_dropped():
    assert data.report_sentences("Mass of 2.35 cm.. none. NONE . Stable since 2.0. ok 3. 4 items") == [
        "Mass of 2.35 cm", "Stable since 2.0", "ok 3", "4 items"]


def test_deterministic_caption_is_all_sentences_in_order_lower_cased():
    assert data.report_to_caption("A B.\n  Second   line. None.", deterministic=True) == "a b. second line. "


def test_report_without_valid_sentence_gives_empty_caption():
    assert data.report_to_caption(" None. . ", torch.Generator().manual_seed(1)) == ""


def test_positive_report_keeps_the_sentences_without_a_negation_cue():
    report = ("Small left pleural effusion. No pneumothorax. Heart size is normal. The lungs are clear. "
              "Endotracheal tube in standard position. There is no focal consolidation.")
    assert data.positive_report(report) == "Small left pleural effusion. Endotracheal tube in standard position."
    assert data.positive_report("No acute process. Lungs are clear.") == data.NO_FINDING_CAPTION
    assert data.positive_report("Nothing new. Clearly enlarged heart.") == "Nothing new. Clearly enlarged heart."


def test_caption_sources_change_only_the_positive_reports_and_reject_unknown_names():
    reports = {"1": "Mild edema. No effusion.", "2": "No acute process."}
    assert data.caption_reports(reports, "report") is reports and data.caption_reports(reports, "impression") is reports
    assert data.caption_reports(reports, "positive") == {"1": "Mild edema.", "2": data.NO_FINDING_CAPTION}
    with pytest.raises(ValueError, match="choose one of report, impression, positive"):
        data.caption_reports(reports, "findings")


def test_seeded_generator_pins_the_caption():
    report = "One. Two. Three. Four. Five."
    first = [data.report_to_caption(report, torch.Generator().manual_seed(seed)) for seed in range(20)]
    again = [data.report_to_caption(report, torch.Generator().manual_seed(seed)) for seed in range(20)]
    assert first == again and len(set(first)) > 5


def test_every_caption_is_a_nonempty_subset_of_sentences_and_k_is_uniform():
    report = "Alpha one. Beta two. Gamma 3.5 three."
    sentences = {"alpha one", "beta two", "gamma 3.5 three"}
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(4)
    for _ in range(3000):
        caption = data.report_to_caption(report, generator)
        assert caption.endswith(". ")
        kept = caption[:-2].split(". ")
        assert len(kept) == len(set(kept)) >= 1 and set(kept) <= sentences
        counts[len(kept)] += 1
    assert np.all(np.abs(counts[1:] / 3000 - 1 / 3) < 0.04)  # k uniform on {1, 2, 3}


def test_report_sections_are_parsed_from_mimic_text_with_fallback_to_last_paragraph():
    text = mimic_report(NORMAL_FINDINGS, "No acute cardiopulmonary process.", None)
    sections = data.parse_report_sections(text)
    assert sections["findings"] == " ".join(NORMAL_FINDINGS.split())
    assert data.compose_report(sections) == " ".join(NORMAL_FINDINGS.split()) + " No acute cardiopulmonary process."
    old = data.parse_report_sections(mimic_report(None, None, "Lungs are clear.  No effusion"))
    assert data.compose_report(old) == "Lungs are clear. No effusion."
    assert data.compose_report(data.parse_report_sections(mimic_report(None, None, None))) == ""  # COMPARISON only


# ---------------------------------------------------------------------------------------------------------
# Images (D8)

def test_preprocessing_normalises_with_released_constants_and_replicates_grey():
    pixels = np.array([[0, 128], [255, 128]], np.uint8).repeat(8, 0).repeat(8, 1)  # 16 x 16
    x = data.preprocess_image(Image.fromarray(pixels), 16, in_chans=3)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert x[0, 0, 0].item() == pytest.approx((0 - 0.4978) / 0.2449, abs=1e-6)  # -2.03267
    assert x[0, 0, 15].item() == pytest.approx((128 / 255 - 0.4978) / 0.2449, abs=1e-6)  # 0.016990
    assert x[0, 15, 0].item() == pytest.approx((1 - 0.4978) / 0.2449, abs=1e-6)  # 2.05063
    assert data.preprocess_image(Image.fromarray(pixels).convert("RGB"), 16, in_chans=1).shape == (1, 16, 16)


def test_sixteen_bit_png_is_min_max_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert np.array_equal(data.resize_to_square(image, 2), [[0, 64], [128, 255]])


def test_letterbox_keeps_whole_image_and_pads_black_floor_half_before():
    wide = Image.fromarray(np.full((11, 32), 200, np.uint8))
    square = data.resize_to_square(wide, 16)  # content 16 x 5 (11 * 16 // 32), padding 11 = 5 above + 6 below
    assert square.shape == (16, 16)
    assert (square[:5] == 0).all() and (square[5:10] == 200).all() and (square[10:] == 0).all()


def test_crop_resizes_short_side_then_takes_the_centre():
    pixels = np.zeros((10, 30), np.uint8)
    pixels[:, 10:20] = 255  # the middle third is white
    square = data.resize_to_square(Image.fromarray(pixels), 10, resize="crop")
    assert square.shape == (10, 10) and (square[:, 2:8] == 255).all()


def test_augmentation_fills_with_black_and_is_reproducible_with_a_generator():
    white = np.full((64, 64), 255, dtype=np.uint8)
    outputs = [data.augment_image(white, torch.Generator().manual_seed(seed)) for seed in range(8)]
    assert all(out.dtype == np.uint8 and out.shape == (64, 64) for out in outputs)
    assert all(out[32, 32] == 255 for out in outputs)  # the centre stays inside the image
    assert any(out[0, 0] == 0 for out in outputs)  # a rotated or shrunk corner is black, not mid-grey
    assert np.array_equal(outputs[3], data.augment_image(white, torch.Generator().manual_seed(3)))


def test_augmentation_flips_half_of_the_images():
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # brighter to the right
    generator = torch.Generator().manual_seed(0)
    flipped = [data.augment_image(ramp, generator)[32, 16] > 128 for _ in range(400)]
    assert 0.42 < np.mean(flipped) < 0.58


# ---------------------------------------------------------------------------------------------------------
# MIMIC-CXR

def test_fixture_has_the_real_mimic_layout(mimic):
    root, _ = mimic
    jpgs = sorted(root.glob("files/p*/p*/s*/*.jpg"))
    assert len(jpgs) == 8 and all(re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}\.jpg", path.name) for path in jpgs)
    assert all(path.parts[-4] == path.parts[-3][:3] for path in jpgs)  # p19/p19999991
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as file:
        assert file.readline().strip() == METADATA_HEADER
    with open(root / "mimic_cxr_sectioned.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[1][0] == "s59999991" and "\n" in rows[1][2]  # s prefix, quoted multi-line findings


@pytest.mark.parametrize("source", ["txt", "sectioned"])
def test_mimic_keeps_frontal_images_of_the_split_and_counts_empty_reports(mimic, source, capsys):
    root, sectioned = mimic
    dataset = data.MimicCXR(root, split="train", image_size=16,
                            report_source="txt" if source == "txt" else sectioned)
    assert [item[2] for item in dataset.items] == ["59999991", "59999992", "59999996"]  # PA, AP; no LATERAL
    assert dataset.skipped == {"empty_report": 1, "no_report": 0, "no_split_row": 0}
    assert "skipped 1 studies with an empty report" in capsys.readouterr().out
    assert dataset.reports["59999992"] == ("1. Mild pulmonary edema. 2. Small left pleural effusion measuring "
                                           "1.5 cm.")
    assert dataset.reports["59999996"] == "Lungs are hyperinflated. There is no focal consolidation."
    test = data.MimicCXR(root, split="test", image_size=16, report_source="txt" if source == "txt" else sectioned)
    assert len(test) == 2 and not test.augment and dataset.augment


def test_both_report_sources_give_the_same_reports(mimic):
    root, sectioned = mimic
    from_txt = data.MimicCXR(root, split=None, image_size=16)
    from_csv = data.MimicCXR(root, split=None, image_size=16, report_source=sectioned)
    assert from_txt.items == from_csv.items and from_txt.reports == from_csv.reports


def test_views_and_sections_are_configurable(mimic):
    root, _ = mimic
    lateral = data.MimicCXR(root, split="train", image_size=16, views=("LATERAL",))
    assert len(lateral) == 1
    impression_only = data.MimicCXR(root, split="validate", image_size=16, sections=("impression",))
    assert impression_only.report_texts() == ["no pneumothorax. "]


def test_mimic_item_is_normalised_image_and_full_report_in_evaluation_mode(mimic):
    root, _ = mimic
    dataset = data.MimicCXR(root, split="validate", image_size=16, in_chans=3)
    item = dataset[0]
    assert item["image"].shape == (3, 16, 16)
    assert item["caption"] == "heart size is normal. no pneumothorax. "
    with Image.open(dataset.items[0][1]) as image:
        assert torch.equal(item["image"], data.preprocess_image(image, 16))


def test_seeded_dataset_repeats_items_and_varies_by_epoch(mimic):
    root, _ = mimic
    dataset = data.MimicCXR(root, split="train", image_size=16, seed=7)
    first, again = dataset[0], dataset[0]
    assert torch.equal(first["image"], again["image"]) and first["caption"] == again["caption"]
    epochs = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        epochs.append(dataset[0]["image"])
    assert not all(torch.equal(epochs[0], other) for other in epochs[1:])


def test_collate_tokenizes_with_dynamic_padding_and_drops_unreadable_images_in_workers(mimic, capfd):
    root, _ = mimic
    dataset = data.MimicCXR(root, split="train", image_size=16, seed=0)
    tokenizer = train_tokenizer(dataset.report_texts(), vocab_size=200)
    bad_path = Path(dataset.items[1][1])
    bad_path.write_bytes(b"not a jpeg")
    collate = pickle.loads(pickle.dumps(data.Collate(tokenizer, max_len=100)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
    (batch,) = list(loader)
    assert batch["skipped"] == 1 and batch["images"].shape == (2, 3, 16, 16)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() and (batch["input_ids"][:, 0] == 2).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert data.Collate(tokenizer)([None, None])["skipped"] == 2
    assert str(bad_path) in capfd.readouterr().err  # printed by the worker process


# ---------------------------------------------------------------------------------------------------------
# Open-i

def test_openi_reads_xml_reports_and_png_images_and_skips_empty_reports(tmp_path, capsys):
    make_openi(tmp_path)
    dataset = data.OpenI(tmp_path, image_size=16)
    assert [item[0] for item in dataset.items] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]
    assert dataset.skipped == {"empty_report": 1, "unreadable_xml": 0}
    assert "skipped 1 empty reports" in capsys.readouterr().out
    assert dataset[2]["caption"] == "no acute disease. "  # self-closing empty FINDINGS
    assert dataset[0]["caption"].endswith("there is no pulmonary edema. normal chest x-xxxx. ")
    assert dataset[1]["image"][0, 10, 8].item() == pytest.approx((80 / 255 - 0.4978) / 0.2449, abs=1e-5)
    frontal = data.OpenI(tmp_path, image_size=16, views_csv=tmp_path / "nlmcxr_tsne_pa.csv.gz")
    assert [item[0] for item in frontal.items] == ["CXR1_1_IM-0001-3001", "CXR2_IM-0652-1001"]


# ---------------------------------------------------------------------------------------------------------
# Image cache

def test_cache_round_trip_equals_direct_preprocessing(mimic):
    root, _ = mimic
    dataset = data.MimicCXR(root, split=None, image_size=16)
    data.build_cache(dataset, root / "cache-16", chunk_size=3)
    cached = data.MimicCXR(root, split=None, image_size=16, cache=root / "cache-16")
    assert cached.cache_rows == list(range(len(dataset)))
    for index in range(len(dataset)):
        assert torch.equal(cached[index]["image"], dataset[index]["image"])
    assert json.loads((root / "cache-16" / "progress.json").read_text()) == {"done": len(dataset)}


def test_cache_resumes_after_an_interruption_without_touching_finished_rows(mimic, monkeypatch):
    root, _ = mimic
    dataset = data.MimicCXR(root, split=None, image_size=16)
    resize, calls = data.resize_to_square, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return resize(*args, **kwargs)

    monkeypatch.setattr(data, "resize_to_square", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(dataset, root / "cache", chunk_size=2)
    monkeypatch.setattr(data, "resize_to_square", resize)
    assert json.loads((root / "cache" / "progress.json").read_text()) == {"done": 2}
    before = np.load(root / "cache" / "images.npy")[:2].copy()
    data.build_cache(dataset, root / "cache", chunk_size=2)
    images = np.load(root / "cache" / "images.npy")
    assert np.array_equal(images[:2], before) and (np.load(root / "cache" / "status.npy") == data.CACHED).all()
    for row, (_, path, _) in enumerate(dataset.items):
        with Image.open(path) as image:
            assert np.array_equal(images[row], data.resize_to_square(image, 16))


def test_cache_cli_builds_default_folder_and_records_unreadable_images(mimic, capsys):
    root, _ = mimic
    dataset = data.MimicCXR(root, split=None, image_size=16)
    Path(dataset.items[0][1]).write_bytes(b"\xff\xd8 truncated")
    data.main(["cache", "--root", str(root), "--size", "16", "--workers", "0"])
    status = np.load(root / "cache-16" / "status.npy")
    assert status[0] == data.UNREADABLE and (status[1:] == data.CACHED).all()
    cached = data.MimicCXR(root, split=None, image_size=16, cache=root / "cache-16")
    assert cached[0] is None and dataset.items[0][1] in capsys.readouterr().err


def test_cache_of_another_size_is_refused_and_a_missing_cache_falls_back_to_files(mimic, capsys):
    root, _ = mimic
    data.build_cache(data.MimicCXR(root, split="test", image_size=16), root / "cache-16")
    with pytest.raises(ValueError, match=r"cache-16 holds 16-pixel letterbox images.*32-pixel"):
        data.MimicCXR(root, split="test", image_size=32, cache=root / "cache-16")
    partial = data.MimicCXR(root, split=None, image_size=16, cache=root / "cache-16")
    assert "2 of 6 images cached" in capsys.readouterr().out and partial[0]["image"].shape == (3, 16, 16)
    absent = data.MimicCXR(root, split="test", image_size=16, cache=root / "no-cache")
    assert absent.cache_rows is None and "no image cache at" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other images"):
        data.build_cache(data.MimicCXR(root, split="train", image_size=16), root / "cache-16")


# ---------------------------------------------------------------------------------------------------------
# Bad input

def test_missing_root_and_missing_csv_name_the_expected_file(tmp_path, mimic):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.MimicCXR(tmp_path / "does-not-exist")
    root, _ = mimic
    with pytest.raises(FileNotFoundError, match="sectioned.csv"):
        data.MimicCXR(root, report_source=str(root / "missing_sectioned.csv"))
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-split\.csv"):
        data.MimicCXR(root)
    with pytest.raises(FileNotFoundError, match="ecgen-radiology"):
        data.OpenI(tmp_path)


def test_wrong_header_or_corrupt_csv_names_the_file_and_expected_columns(mimic):
    root, sectioned = mimic
    sectioned.write_text("study,text\ns59999991,No acute process.\n")
    with pytest.raises(ValueError, match="mimic_cxr_sectioned.csv.*lacks"):
        data.MimicCXR(root, split=None, report_source=sectioned)
    write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", "dicom,study,subject,fold", [["a", "1", "2", "train"]])
    with pytest.raises(ValueError, match=r"split\.csv\.gz.*lacks \['dicom_id', 'split'\]"):
        data.MimicCXR(root)
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(ValueError, match=r"split\.csv\.gz: cannot be read as a CSV with columns dicom_id,split"):
        data.MimicCXR(root)


def test_missing_or_corrupt_image_is_a_skip_naming_the_file(mimic, capsys):
    root, _ = mimic
    dataset = data.MimicCXR(root, split="test", image_size=16)
    missing, truncated = Path(dataset.items[0][1]), Path(dataset.items[1][1])
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert dataset[0] is None and dataset[1] is None
    err = capsys.readouterr().err
    assert f"skipping {missing}" in err and f"skipping {truncated}" in err


def test_missing_report_file_and_bad_xml_are_counted_skips(mimic, tmp_path, capsys):
    root, _ = mimic
    (root / "files" / "p19" / "p19999992" / "s59999993.txt").unlink()
    validate = data.MimicCXR(root, split="validate", image_size=16)
    assert len(validate) == 0 and validate.skipped == {"empty_report": 0, "no_report": 1, "no_split_row": 0}
    make_openi(tmp_path / "openi")
    (tmp_path / "openi" / "ecgen-radiology" / "2.xml").write_text("<eCitation><unclosed>")
    openi = data.OpenI(tmp_path / "openi", image_size=16)
    assert openi.skipped["unreadable_xml"] == 1 and "2.xml" in capsys.readouterr().err


def test_wrong_split_section_or_resize_name_says_what_is_allowed(mimic):
    root, _ = mimic
    with pytest.raises(ValueError, match="'validate'"):
        data.MimicCXR(root, split="val")
    with pytest.raises(ValueError, match="unknown report sections"):
        data.MimicCXR(root, sections=("finding",))
    with pytest.raises(ValueError, match="letterbox"):
        data.preprocess_image(Image.new("L", (4, 4)), 4, resize="pad")


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert data.main(["cache", "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_report_that_is_not_utf8_is_read_as_latin1_and_counted(mimic, capsys):
    root, _ = mimic
    report = root / "files" / "p19" / "p19999993" / "s59999994.txt"
    report.write_bytes(report.read_bytes().replace(b"pneumonia", b"pneumonia (r\xe9sum\xe9)"))
    dataset = data.MimicCXR(root, split="test", image_size=16)
    assert "1 report files were not UTF-8 and were read as Latin-1" in capsys.readouterr().out
    assert "pneumonia (résumé)" in dataset.reports["59999994"] and "\ufffd" not in dataset.reports["59999994"]


def test_images_without_a_split_row_are_counted_in_the_summary(mimic, capsys):
    root, _ = mimic
    before = len(data.MimicCXR(root, split="train", image_size=16)), len(data.MimicCXR(root, split=None, image_size=16))
    rows = [line.split(",") for line in gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "rt").read().split()]
    write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ",".join(rows[0]), rows[2:])  # the first image's row lost
    capsys.readouterr()
    train = data.MimicCXR(root, split="train", image_size=16)
    assert "1 images have no row in the split file (in no split)" in capsys.readouterr().out
    assert train.skipped["no_split_row"] == 1 and len(train) == before[0] - 1  # a frontal train image
    assert len(data.MimicCXR(root, split=None, image_size=16)) == before[1]  # the cache (every split) keeps it
