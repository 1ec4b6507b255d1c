"""DINOv2 encoder + DPT decoder, with the original release's parameter names."""
from model.dpt import DPTSegmentor, build_model
from model.loading import WeightsMismatchError, load_pretrained_encoder, load_weights, model_state_from
from model.presets import PATCH_SIZE, PRESETS, ModelPreset, preset

__all__ = ['DPTSegmentor', 'build_model', 'load_weights', 'load_pretrained_encoder', 'model_state_from',
           'WeightsMismatchError', 'PATCH_SIZE', 'PRESETS', 'ModelPreset', 'preset']
