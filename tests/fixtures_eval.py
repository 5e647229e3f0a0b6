"""Tiny evaluation-set fixtures in the exact real on-disk formats (docs/datasets.md §1-§6, checklist §9).

Each builder writes into a given folder (a pytest tmp_path) and returns what the tests need to check the
loader: nothing binary is committed. Images are small grey PNG/JPEG files; labels and headers follow the
real files byte for byte where it matters (header spelling, trailing commas and spaces, CRLF, blanks vs -1.0).
"""
from pathlib import Path

import numpy as np
from PIL import Image

NIH_HEADER_V2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
                    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_HEADER_XRV = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
                   "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
                   "Fracture,Support Devices")
MS_CXR_HEADER = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
SIIM_POSITIVE = "1.2.276.0.7230010.3.1.4.8323329.31952.1517875157.662284"
SIIM_NEGATIVE = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
SIIM_TWO_REGIONS = "1.2.276.0.7230010.3.1.4.8323329.11028.1517875229.983789"
DICOM_IDS = ["1a2b3c4d-5e6f7a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b", "aa11bb22-cc33dd44-ee55ff66-77889900-aabbccdd",
             "0f1e2d3c-4b5a6978-8796a5b4-c3d2e1f0-0a1b2c3d"]


def write_image(path: Path, size=(16, 16), value: int = 128) -> Path:
    """A small 8-bit grey image with a gradient (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = (np.add.outer(np.arange(height), np.arange(width)) * 3 + value) % 256
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
    return path


def write_text(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(text.replace("\n", newline))
    return path


def make_nih(root: Path, maco_lists: bool = False) -> dict:
    """Official NIH-Box v2020 Data_Entry (Patient Sex, trailing comma) and a CRLF test list without a final
    newline; with `maco_lists`, torchxrayvision's header and MaCo's `<name> <14 labels>` list instead."""
    rows = [("00000001_000.png", "Cardiomegaly", "0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002"),
            ("00000001_001.png", "Cardiomegaly|Emphysema", "1,1,58,M,PA,2894,2729,0.14300000000000002,0.14300000000000002"),
            ("00007816_000.png", "No Finding", "0,7816,64,F,AP,3056,2544,0.139,0.139"),
            ("00023313_002.png", "Effusion|Pneumothorax|Pleural_Thickening", "2,23313,40,F,PA,2048,2500,0.168,0.168")]
    trailing = "" if maco_lists else ","
    text = (NIH_HEADER_XRV if maco_lists else NIH_HEADER_V2020) + "\n"
    text += "".join(f"{name},{labels},{rest}{trailing}\n" for name, labels, rest in rows)
    write_text(root / ("Data_Entry_2017.csv" if maco_lists else "Data_Entry_2017_v2020.csv"), text)
    test_names = ["00000001_001.png", "00007816_000.png", "00023313_002.png"]
    if maco_lists:  # MaCo's lists carry the labels; the last one deliberately differs from the CSV
        lines = ["00000001_001.png 0 1 0 0 0 0 0 0 0 0 1 0 0 0", "00007816_000.png 0 0 0 0 0 0 0 0 0 0 0 0 0 0",
                 "00023313_002.png 0 0 1 0 0 0 0 1 0 0 0 0 0 0"]
    else:
        lines = test_names
    write_text(root / "test_list.txt", "\n".join(lines), newline="\r\n")
    for name, _, _ in rows:
        write_image(root / "images" / name)
    return dict(names=test_names)


RSNA_IDS = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4",
            "2d29c5d7-cd1e-4fb7-896b-c55b69ca6c96"]


def make_rsna(root: Path, dicom_only: bool = False) -> dict:
    """stage_2_train_labels.csv (a patient repeats once per box; negatives have empty box fields), MaCo's split
    list with a trailing space on every line (test images' labels only exist in the list), PNG images."""
    write_text(root / "stage_2_train_labels.csv",
               "patientId,x,y,width,height,Target\n"
               f"{RSNA_IDS[0]},,,,,0\n"
               f"{RSNA_IDS[1]},264.0,152.0,213.0,379.0,1\n"
               f"{RSNA_IDS[1]},562.0,152.0,256.0,453.0,1\n")
    write_text(root / "test_list.txt",
               f"stage_2_train_images/{RSNA_IDS[0]}.dcm 0 \nstage_2_train_images/{RSNA_IDS[1]}.dcm 1 \n"
               f"stage_2_test_images/{RSNA_IDS[2]}.dcm 1 \n")
    folders = ["stage_2_train_images", "stage_2_train_images", "stage_2_test_images"]
    for folder, pid in zip(folders, RSNA_IDS):
        if dicom_only:
            write_text(root / folder / f"{pid}.dcm", "DICM")  # the reader must refuse it before opening
        else:
            write_image(root / folder / f"{pid}.png", (20, 20))
    return dict(labels=[0.0, 1.0, 1.0])


SIIM_RLE = "870068 1 1018 7 988 36 988 35 989 35 991 32 996 27 1001 20 1006 16 1011 10"


def make_siim(root: Path, leading_space: bool = True) -> dict:
    """train-rle.csv with the real " EncodedPixels" header; values with the Kaggle leading space or without
    (torchxrayvision copy); an image with two region rows; JPEG images nested Study/Series/SOP."""
    space = " " if leading_space else ""
    write_text(root / "train-rle.csv",
               "ImageId, EncodedPixels\n"
               f"{SIIM_NEGATIVE},{space}-1\n"
               f"{SIIM_POSITIVE},{space}{SIIM_RLE}\n"
               f"{SIIM_TWO_REGIONS},{space}10 5\n"
               f"{SIIM_TWO_REGIONS},{space}1000 3 20 2\n")
    for k, image_id in enumerate([SIIM_NEGATIVE, SIIM_POSITIVE, SIIM_TWO_REGIONS]):
        write_image(root / "jpg-images-train" / f"1.2.276.0.7230010.3.1.2.{k}" / f"1.2.276.0.7230010.3.1.3.{k}"
                    / f"{image_id}.jpg")
    write_text(root / "test_list.txt", f"{SIIM_POSITIVE}\n{SIIM_TWO_REGIONS}\n")
    return dict(ids=[SIIM_NEGATIVE, SIIM_POSITIVE, SIIM_TWO_REGIONS])


def make_chexpert(root: Path) -> dict:
    """CheXpert-v1.0-small/{train,valid}.csv with `Path` including the top folder; 1.0/0.0/-1.0/blank labels."""
    folder = root / "CheXpert-v1.0-small"
    train_rows = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
        "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
        "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
    ]
    valid_rows = ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,"
                  "0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0"]
    write_text(folder / "train.csv", CHEXPERT_HEADER + "\n" + "\n".join(train_rows) + "\n")
    write_text(folder / "valid.csv", CHEXPERT_HEADER + "\n" + "\n".join(valid_rows) + "\n")
    for row in train_rows + valid_rows:
        write_image(root / row.split(",")[0], (20, 24))
    return dict(folder=folder)


def make_ms_cxr(csv_folder: Path, mimic_root: Path) -> dict:
    """MS_CXR_Local_Alignment_v1.0.0.csv in the converter's column order: one row per box, so a phrase with
    two boxes has two rows; boxes in original pixels; images under mimic_root/files/pXX/pSUBJECT/sSTUDY/."""
    paths = [f"files/p19/p19999991/s59999991/{DICOM_IDS[0]}.jpg", f"files/p19/p19999991/s59999992/{DICOM_IDS[1]}.jpg"]
    rows = [f"{DICOM_IDS[0]},Pneumonia,Patchy right lower lobe opacity,{paths[0]},14,17,6,7,25,30",
            f"{DICOM_IDS[0]},Pleural Effusion,small bilateral pleural effusions,{paths[0]},1,22,5,4,25,30",
            f"{DICOM_IDS[0]},Pleural Effusion,Small bilateral pleural effusions,{paths[0]},4,22,5,4,25,30",
            f"{DICOM_IDS[1]},Cardiomegaly,Mild cardiomegaly,{paths[1]},10,12,20,10,40,30"]
    write_text(csv_folder / "MS_CXR_Local_Alignment_v1.0.0.csv", MS_CXR_HEADER + "\n" + "\n".join(rows) + "\n")
    write_image(mimic_root / paths[0], (25, 30))
    write_image(mimic_root / paths[1], (40, 30))
    return dict(paths=paths)


def make_synthetic_labels(root: Path) -> dict:
    """synthetic-labels.csv as world/synthetic.py writes it (for header tests; the real world comes from conftest)."""
    write_text(root / "synthetic-labels.csv", "dicom_id,subject_id,study_id,split,path,edema\n"
               f"{DICOM_IDS[0]},19999991,59999991,test,files/p19/p19999991/s59999991/{DICOM_IDS[0]}.jpg,1\n")
    write_image(root / "files/p19/p19999991/s59999991" / f"{DICOM_IDS[0]}.jpg")
    return dict(classes=["edema"])


def rewrite_header(path: Path, header: str) -> Path:
    """Replace the first line of a CSV, for the wrong-header tests."""
    lines = path.read_text().split("\n")
    path.write_text("\n".join([header] + lines[1:]))
    return path
