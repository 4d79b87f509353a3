"""Deployable hash encoders exported from a training run.

  savedmodel  load_run (restore a run), the signatures, export_saved_model into TF Serving's
              versioned layout (next_version, new_version, resolve_saved_model), ExportError
  tflite      convert_tflite and write_tflite_variants (float32, float16, dynamic-range, int8)
  quantisation_aware  fine_tune_for_int8: a backbone copy fine-tuned under simulated int8 arithmetic
  parity      parity_report (and image_parity_report) of exported encoders against the Keras model, as a table
  serving     TF Serving: warmup requests (written at export), models.config, gRPC PredictRequests
The encoders that run these files are in `tbhvae.encoders`.

A SavedModel exported from a training run holds these signatures, all deterministic
(outputs for a batch of B inputs, M bits, D feature dimensions):
  encode_features  features      float32 [B, D]           the hash head alone
  encode_images    images        uint8 [B, H, W, 3]       resize + backbone + hash head (any H, W)
  encode_jpeg      encoded_jpeg  string [B]               JPEG/PNG files, decoded then as encode_images
  serving_default  encode_features, or encode_images when chosen
and each returns
  bits    uint8 [B, M]             0/1 code, 1[logit > 0]
  packed  uint8 [B, ceil(M / 8)]   the bits packed in the order of `tbhvae.codes` (np.packbits)
  probs   float32 [B, M]           sigmoid(logit)
The image signatures exist only when the run was trained on features of a known backbone.
TFLite variants hold the feature encoder under the signature key "serving_default"
with the same input and output names.
"""
from tbhvae.export.parity import compare_codes, format_parity_table, image_parity_report, parity_report
from tbhvae.export.quantisation_aware import fine_tune_for_int8
from tbhvae.export.savedmodel import (
                                      METADATA_FILE,
                                      OUTPUT_NAMES,
                                      Backbone,
                                      ExportError,
                                      TrainedRun,
                                      export_saved_model,
                                      hash_outputs,
                                      load_backbone,
                                      load_run,
                                      new_version,
                                      next_version,
                                      pack_bits,
                                      resolve_saved_model,
                                      run_backbone,
                                      write_image_encoder,
)
from tbhvae.export.serving import (
                                      MODELS_CONFIG_FILE,
                                      WARMUP_FILE,
                                      grpc_predict_request,
                                      models_config,
                                      prediction_log,
                                      warmup_inputs,
                                      write_models_config,
                                      write_warmup_requests,
)
from tbhvae.export.tflite import TFLITE_VARIANTS, convert_tflite, representative_rows, write_tflite_variants

__all__ = [
    "METADATA_FILE", "MODELS_CONFIG_FILE", "OUTPUT_NAMES", "TFLITE_VARIANTS", "WARMUP_FILE", "Backbone",
    "ExportError", "TrainedRun", "compare_codes", "convert_tflite", "export_saved_model", "fine_tune_for_int8",
    "format_parity_table",
    "grpc_predict_request", "hash_outputs", "image_parity_report", "load_backbone", "load_run", "models_config",
    "new_version",
    "next_version", "pack_bits", "parity_report", "prediction_log", "representative_rows",
    "resolve_saved_model", "run_backbone", "warmup_inputs", "write_image_encoder", "write_models_config",
    "write_tflite_variants", "write_warmup_requests",
]
