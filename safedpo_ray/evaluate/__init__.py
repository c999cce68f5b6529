"""Evaluation of SafeDPO models: implicit rewards, generation (hf and vllm engines, same prompt
tokens), cost/reward scoring (safe-rlhf score models loaded strictly), the paper's protocol
(normalised helpfulness, win rates, bootstrap intervals), XSTest, an LLM judge, resumable runs,
reports; and training of the cost/reward score models (`train-scorer`). See commands.py."""
