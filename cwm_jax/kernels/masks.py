"""Who may attend to whom: the single definition used by every backend.

A query at index q in segment s may see key k iff the key is in the same
segment, not in the future, and inside the layer's window: `q - k < window`
(the window counts the query itself, as in Meta's and Hugging Face's code).
Segment ids are >= 0 for real tokens; kernels pad with negative ids.
"""

import jax.numpy as jnp

PAD_Q_SEGMENT = -1  # padded query rows; never equal to a key's segment
PAD_K_SEGMENT = -2  # padded key rows


def pad_rows(x, rows: int, value):
  """`x` with `rows` more rows (axis 1, the sequence) of `value` at the end."""
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, rows)
  return jnp.pad(x, widths, constant_values=value)


def pad_segments(q_seg_BT, k_seg_BS, q_rows: int, k_rows: int):
  """Query and key segment ids with `q_rows` / `k_rows` padding rows at the end, in
  segments no real row shares and unequal to each other: padding sees and is seen by none."""
  return pad_rows(q_seg_BT, q_rows, PAD_Q_SEGMENT), pad_rows(k_seg_BS, k_rows, PAD_K_SEGMENT)


def allowed(q_idx, k_idx, q_seg, k_seg, window):
  """Boolean mask, broadcasting `[..., T, 1]` queries against `[..., 1, S]` keys."""
  delta = q_idx - k_idx
  return (q_seg == k_seg) & (delta >= 0) & (delta < window)
