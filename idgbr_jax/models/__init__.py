"""Networks: Stage I backbones (`backbones/`) and the Stage II refiner's parts."""
