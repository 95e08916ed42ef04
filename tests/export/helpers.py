"""What the export tests share: transformers' side of a greedy-generation comparison."""
import torch


def hf_greedy(model, prompt, n):
    """transformers' greedy tokens, exactly `n`: eos may be chosen and does not stop it (as our
    `stop_ids=[]`; `min_new_tokens` would instead forbid eos, a different argmax)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()
