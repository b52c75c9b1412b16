"""Column names of the per-pair table (no imports: the data checks use them without torch)."""

GROUP_COLUMNS: tuple[str, ...] = ("saliency_method", "dataset", "model")
# one explain unit's records (cose.engine.explain_unit)
UNIT_COLUMNS: tuple[str, ...] = (
    "test_idx",
    "target_class",
    "pred_class",
    "transform_type",
    "transform_magnitude",
    "t_pred_class",
    "ssim",
    "spearman",
)
# the per-pair table: a unit's records with the (dataset, model, method) they belong to
PAIR_COLUMNS: tuple[str, ...] = ("dataset", "model", "saliency_method", *UNIT_COLUMNS)
