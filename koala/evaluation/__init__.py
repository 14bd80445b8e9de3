"""Evaluation on published protocols from local safetensors: FID (TF Inception), CLIP score, HPSv2, PickScore."""
