"""Turns images into numbers: FID, KID, precision/recall and IS through torch-fidelity.

    extractor = get_extractor("auto", dataset="mnist")         # classifier offline, inception when its weights are here
    metrics = compute_metrics(fake_uint8, real_uint8, extractor, real_key="mnist-test-2000")

It knows nothing of generators: images in (uint8 [n c h w]), numbers out.
"""

from evaluation.classifier import CLASSIFIERS, Classifier, ClassifierConfig, ClassifierRecipe, accuracy, train_classifier
from evaluation.common import EvaluationError
from evaluation.extractors import (
    INCEPTION_ENV,
    INCEPTION_MODES,
    KINDS,
    Extractor,
    get_extractor,
    has_labels,
    inception_available,
    inception_hub_file,
    resolve_inception_weights,
)
from evaluation.metrics import UInt8Images, class_accuracy, compute_metrics, extract_features, reference_cache_name
from vqdiff.data import CACHE_ENV, resolve_cache_dir

__all__ = [
    "CACHE_ENV",
    "INCEPTION_ENV",
    "INCEPTION_MODES",
    "KINDS",
    "Classifier",
    "ClassifierConfig",
    "ClassifierRecipe",
    "CLASSIFIERS",
    "EvaluationError",
    "Extractor",
    "UInt8Images",
    "accuracy",
    "class_accuracy",
    "compute_metrics",
    "extract_features",
    "get_extractor",
    "has_labels",
    "inception_available",
    "inception_hub_file",
    "reference_cache_name",
    "resolve_cache_dir",
    "resolve_inception_weights",
    "train_classifier",
]
