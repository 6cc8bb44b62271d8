"""Test helpers: DICOM series written by the tests themselves (not by the project's writer), so
reading is checked against files whose every tag the test chose."""

from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[2]
REAL_KERNELS = REPO.parent / "shared" / "data" / "real-kernels"


def make_ct_dataset(
    stored: np.ndarray,
    position,
    *,
    series_uid: str,
    study_uid: str,
    instance: int,
    frame_uid: str = "1.2.826.0.1.3680043.8.498.1",
    spacing=(0.75, 0.8),
    orientation=(1, 0, 0, 0, 1, 0),
    kernel="B30f",
    modality="CT",
    slope=1.0,
    intercept=-1024.0,
    unsigned=True,
    with_rescale=True,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P0001", "19600101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101010", "ACC1"
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = modality, "SIEMENS", "SOMATOM Force"
    ds.ConvolutionKernel, ds.SliceThickness, ds.KVP = kernel, "1.5", "120"
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = f"Chest {kernel}", 3, instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0 if unsigned else 1
    if with_rescale:
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    ds.PixelData = stored.astype(np.uint16 if unsigned else np.int16).tobytes()
    ds.preamble = b"\0" * 128
    return ds


def save_dataset(ds: Dataset, path: Path) -> None:
    """A conformant file with pydicom 3 or 2.4 (Slicer's version), written without the project's code."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        syntax = ds.file_meta.TransferSyntaxUID
        try:
            ds.is_little_endian, ds.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
        except ValueError:  # an encapsulated syntax newer than pydicom 2.4 (e.g. HTJ2K): 2.4's writer refuses it
            _save_unknown_encapsulated(ds, path)
            return
        ds.save_as(path, write_like_original=False)


def _save_unknown_encapsulated(ds: Dataset, path: Path) -> None:
    """Preamble, file meta, then the dataset as explicit VR little endian with undefined-length pixel data."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds["PixelData"].is_undefined_length = True
    with open(path, "wb") as raw:
        raw.write(ds.preamble + b"DICM")
        out = DicomFileLike(raw)
        write_file_meta_info(out, ds.file_meta, enforce_standard=True)
        out.is_little_endian, out.is_implicit_VR = True, False
        write_dataset(out, ds)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing_z: float = 1.5,
    spacing_xy=(0.75, 0.8),
    origin=(-100.0, -120.0, 50.0),
    shuffle: bool = True,
    positions=None,
    **kwargs,
) -> dict:
    """Write HU (z, y, x) as a classic CT series stored unsigned with intercept -1024, files in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    slope, intercept = kwargs.get("slope", 1.0), kwargs.get("intercept", -1024.0)
    stored = np.rint((hu - intercept) / slope)
    order = np.random.default_rng(1).permutation(len(hu)) if shuffle else np.arange(len(hu))
    for n, k in enumerate(order):
        position = positions[k] if positions is not None else (origin[0], origin[1], origin[2] + k * spacing_z)
        ds = make_ct_dataset(stored[k], position, series_uid=series_uid, study_uid=study_uid, frame_uid=frame_uid, instance=int(k) + 1,
                             spacing=(spacing_xy[1], spacing_xy[0]), **kwargs)
        save_dataset(ds, folder / f"file{n:03d}.dcm")
    return {"series_uid": series_uid, "study_uid": study_uid, "frame_uid": frame_uid}


def ramp_volume(slices=4, rows=24, cols=20) -> np.ndarray:
    """A volume whose every voxel differs: any flip, transpose or slice swap changes it."""
    z, y, x = np.mgrid[0:slices, 0:rows, 0:cols]
    return (-1000 + 7 * x + 31 * y + 401 * z).astype(np.float32)


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper is dead); reads /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def train_tiny_models(root: Path) -> Path:
    """A one-epoch RadiomicGAN (``root/gan``, random encoder, no schedule) and a fitted filter (``root/filter``)
    trained on two 32-pixel phantom pairs: the models the background-job tests run."""
    from radiomicgan.simulate import simulate_phantom_pairs
    from radiomicgan.train import TrainConfig, train

    simulate_phantom_pairs(root / "pairs", cases=2, size=32, slices=2, seed=1)
    train(root / "pairs", root / "gan", TrainConfig(epochs=1, steps_per_epoch=2, batch=2, crop=32, vgg_weights="random",
                                                    schedule="none", val_slices=1, device="cpu"), progress=False)
    train(root / "pairs", root / "filter", TrainConfig(method="filter"), progress=False)
    return root


def oblique_scan(slices=2, kernel="B30f"):
    """A small phantom scan under a rotated direction and odd spacing/origin (geometry must survive a round trip)."""
    from radiomicgan.simulate import phantom_pair
    from radiomicgan.volume import CTMetadata, CTVolume

    source, _, _ = phantom_pair(size=32, slices=slices, seed=4)
    c, s = np.cos(0.3), np.sin(0.3)
    return CTVolume(hu=source.hu, spacing=(0.7, 0.8, 2.0), origin=(-40.0, 25.0, 90.0),
                    direction=tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel()), meta=CTMetadata(kernel=kernel))


def limit_file_size(limit: int):
    """A ``preexec_fn``: files the child writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ
    ignored, so the write fails instead of the process being killed)."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


@contextlib.contextmanager
def file_size_limit(limit: int):
    """The same limit in this process for the block (raised back after it): a full disk for the code run in it."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
