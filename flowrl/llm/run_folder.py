"""The LLM run folder: the image trainer's (config, metrics.jsonl, atomic checkpoints, exact resume, reward curve)
with the weights in transformers / peft form: checkpoints hold the LoRA adapter alone (``adapter_model.safetensors``
from peft's ``save_pretrained``), the outputs are ``lora/`` (load with ``PeftModel.from_pretrained``) or
``model/`` (``AutoModelForCausalLM.from_pretrained``), each with the tokenizer."""
from __future__ import annotations

from pathlib import Path

from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from flowrl.train.run_folder import RunFolder

ADAPTER = "adapter_model.safetensors"


class LMRunFolder(RunFolder):
    def _save_lora_hook(self, models, weights, output_dir):
        weights.clear()  # the frozen base is not saved with every checkpoint
        if self.acc.is_main_process:
            self.acc.unwrap_model(self.m.model).save_pretrained(output_dir)

    def _load_lora_hook(self, models, input_dir):
        models.clear()
        path = Path(input_dir) / ADAPTER
        result = set_peft_model_state_dict(self.acc.unwrap_model(self.m.model), load_file(str(path)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path}: adapter weights {result.unexpected_keys[:5]} do not fit this model")

    def save_weights(self, views=None) -> None:
        """The trained weights, with the tokenizer: ``lora/`` (the adapter) or ``model/``. Main process only."""
        out = self.path / ("lora" if self.cfg.finetune.mode == "lora" else "model")
        self.acc.unwrap_model(self.m.model).save_pretrained(out)
        self.m.tokenizer.save_pretrained(out)
