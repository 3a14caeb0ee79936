"""The ``fairkv`` SGLang attention backend over the ragged per-head KV pool."""
