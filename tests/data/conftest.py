"""The tokenizers the data tests check against: the LLaMA-3 fixture and SmolLM2-135M-Instruct."""
import pytest
import transformers


@pytest.fixture(scope="session")
def llama3(llama3_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
