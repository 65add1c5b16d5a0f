"""The updates of weight matrices other than AdamW's (Muon, GaLore, SOAP), as optax
GradientTransformations, and the logical-name split that decides which parameters they get.
jaxpar.train.optimizer.make_optimizer assembles them."""
