"""Finetuning a pretrained GPT (book chapters 6-7 and appendix E): classification, instruction data, LoRA.

Importing it registers with the checkpoint layer how to rebuild a LoRA model: its config holds
{"rank", "alpha"} under "lora", and load_checkpoint adds the same adapters before loading them."""
from tinygpt.checkpoint import register_model_change
from tinygpt.finetune.classify import (ClassificationDataset, balance_classes, calc_accuracy, class_logits, classify,
                                       make_classifier, random_split, read_labelled_file, train_classifier_simple)
from tinygpt.finetune.instruct import (InstructionDataset, extract_response, format_input, format_response,
                                       instruction_collate, load_instruction_data)
from tinygpt.finetune.lora import LinearWithLoRA, LoRALayer, merge_lora, replace_linear_with_lora

register_model_change("lora", replace_linear_with_lora)

__all__ = ["make_classifier", "read_labelled_file", "balance_classes", "random_split", "ClassificationDataset",
           "class_logits", "calc_accuracy", "train_classifier_simple", "classify", "format_input", "format_response", "load_instruction_data",
           "InstructionDataset", "instruction_collate",
           "extract_response", "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "merge_lora"]
