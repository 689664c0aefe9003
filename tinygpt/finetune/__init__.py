"""Finetuning a pretrained GPT (book chapters 6-7 and appendix E): instruction data and LoRA."""
from tinygpt.finetune.instruct import (InstructionDataset, extract_response, format_input, format_response,
                                       instruction_collate, load_instruction_data)
from tinygpt.finetune.lora import LinearWithLoRA, LoRALayer, merge_lora, replace_linear_with_lora

__all__ = ["format_input", "format_response", "load_instruction_data", "InstructionDataset", "instruction_collate",
           "extract_response", "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "merge_lora"]
