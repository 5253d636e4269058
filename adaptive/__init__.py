"""TDC Training + Proxy-based Pruning (arXiv 2312.13307): SNR timestep groups, one network per
group pruned from a base network to a FLOPs budget (progressive scaling)."""
