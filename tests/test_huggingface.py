"""A Hugging Face TF model (its own train_step) compiled with AccumOptimizer, against the big batch.

Runs where transformers installs beside TensorFlow: tox's py311-tf215 env
(TF 2.15, transformers 4.44, which wants tf-keras). transformers switches
TensorFlow to tf-keras when it is imported, so the model trains in a
subprocess, which leaves this pytest process's Keras alone. The model is
built from a tiny config: nothing is downloaded.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import helpers

helpers.require_mode(eager=True)
# Core, so that py311-tf215's eager pass (the core subset) runs it: nowhere
# else is transformers installed, and the module skips itself there.
pytestmark = [pytest.mark.heavy, pytest.mark.core]
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed here (tox installs it in py311-tf215)", allow_module_level=True)

_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    from transformers import BertConfig, TFBertForSequenceClassification
    from gradaccum import AccumOptimizer
    from oracles import differential  # records the error itself ($GRADACCUM_FIGURES is inherited)

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 50, size=(64, 8)).astype("int32")
    labels = rng.randint(0, 2, size=(64,)).astype("int32")

    def build():
        model = TFBertForSequenceClassification(config)
        model(ids[:1])
        return model

    initial = build().get_weights()

    def fit(n, batch_size):
        optimizer = tf.keras.optimizers.SGD(0.1, momentum=0.9)
        model = build()
        model.set_weights(initial)
        model.compile(optimizer=AccumOptimizer(optimizer, n) if n is not None else optimizer)  # the model's train_step computes its own loss
        model.fit({"input_ids": ids}, labels, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
        return model.get_weights(), int(model.optimizer.iterations.numpy())

    # 64 samples: whole windows of 4 x 8.
    _, big, _ = differential("huggingface/TFBert own train_step", initial, fit, 4, 8)
    assert big[1] == 4, big[1]
""")


def test_a_hugging_face_model_with_its_own_train_step_matches_the_big_batch(tmp_path):
    script = tmp_path / "hf.py"
    script.write_text(_SCRIPT)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
