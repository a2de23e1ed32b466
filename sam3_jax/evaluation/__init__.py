"""Metrics a fine-tuned model is judged by: DAVIS J&F (`jf`), COCO box/mask AP (`coco`) and
YouTube-VIS video mAP (`ytvis`). Pure numpy / pycocotools, so they run anywhere a trainer does;
`python -m sam3_jax.evaluate` is the command-line front end."""
