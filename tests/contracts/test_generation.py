"""The Generator contract: sampling parameters are checked, generators register and build by name."""

import pytest

from swiftk.contracts import Completion, Generator, SamplingParams, build_generator, lookup, register_generator


def test_sampling_params_report_every_bad_value_at_once() -> None:
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy
    with pytest.raises(ValueError, match=r"temperature = -1.*top_p = 0.*n = 0"):
        SamplingParams(temperature=-1, top_p=0, n=0)
    with pytest.raises(ValueError, match="tuple of strings"):
        SamplingParams(stop="\n")  # type: ignore[arg-type]


def test_a_registered_generator_is_built_by_name_with_the_model_and_tokenizer() -> None:
    @register_generator("echo")
    class Echo:
        def __init__(self, model: object, tokenizer: object, suffix: str = "!") -> None:
            self.suffix, self.version = suffix, 0

        def generate(self, prompts, sampling, *, templated=False):  # type: ignore[no-untyped-def]
            return [Completion(p + self.suffix, [], None, "stop", i) for i, p in enumerate(prompts)
                    for _ in range(sampling.n)]

        def load_weights(self, version, tensors=None, adapter=None):  # type: ignore[no-untyped-def]
            self.version = version
            return version

        def close(self) -> None: ...

    echo = build_generator("echo", None, None, suffix="?")
    assert isinstance(echo, Generator) and echo.load_weights(2) == 2 == echo.version
    assert [c.text for c in echo.generate(["a", "b"], SamplingParams(n=2))] == ["a?", "a?", "b?", "b?"]
    import swiftk.plugins  # noqa: F401  (registers the built-ins)

    hf = lookup("generator", "hf")  # its config table sets what follows the kernel's model and tokenizer
    assert hf.target.__name__ == "HFGenerator" and next(iter(hf.config_signature().parameters)) == "system_prompt"
