"""Group level: reads what participant level wrote and summarises it.

* :mod:`.collect` the synthetic images, their sidecars, segmentations and lesion masks, and
  what is missing (participants or scans without outputs);
* :mod:`.qc` simple QC numbers per image and robust outlier flags;
* :mod:`.tables` ``group_desc-qc.tsv`` and ``group_desc-volumes.tsv`` (+ JSON dictionaries);
* :mod:`.templates` TemplateFlow templates from ``$TEMPLATEFLOW_HOME`` (offline-friendly);
* :mod:`.register` ANTsPy registration to the template (affine then SyN), BIDS-named transforms;
* :mod:`.atlas` median template and lesion frequency map;
* :mod:`.run` the whole group level (``analysis_level group``).
"""
