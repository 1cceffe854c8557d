"""What the generic layers need to know about Wan (`WanTransformer3DModel`) and Wan VACE
(`WanVACETransformer3DModel`), kept with the model: their parallel plans (`imagine.models.wan.parallel`)."""
