"""DINOv2 (or DINOv3, or a library's) encoder + DPT decoder, with the original release's parameter names."""
from model.dpt import DPTSegmentor, build_model
from model.loading import WeightsMismatchError, load_pretrained_encoder, load_weights, model_state_from
from model.presets import DINOV3_PRESETS, PATCH_SIZE, PRESETS, DinoV3Preset, ModelPreset, preset

__all__ = ['DPTSegmentor', 'build_model', 'load_weights', 'load_pretrained_encoder', 'model_state_from',
           'WeightsMismatchError', 'PATCH_SIZE', 'PRESETS', 'ModelPreset', 'preset', 'DINOV3_PRESETS',
           'DinoV3Preset']
