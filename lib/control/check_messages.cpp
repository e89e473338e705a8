// The agreement check as messages: one round of recursive doubling at a time (check.cpp's
// learn() plans the rounds, test() drives them). A message is the sender's state; a large one
// goes in two fragments of one tag.
#include <algorithm>

#include "control/check.hpp"
#include "hma/error.hpp"

namespace hma::detail {

std::size_t ControlCheck::first_fragment(std::size_t words) noexcept {
  if (words <= kInlineWords) return words;
  if (words <= 2 * kInlineWords) return kInlineWords;  // two inline messages beat one that is not
  return std::min(words, kFirstWords);
}

void ControlCheck::post(const Round& r) {
  got_ = 0;
  if (r.send) {
    // Sent first: the receives below are posted while the message travels (the partner's is
    // usually still on its way; one already there waits for them as an unexpected message).
    // A large payload in two fragments of one tag: MPI keeps their order.
    const std::size_t first = first_fragment(state_.size());
    check(MPI_Isend(state_.data(), static_cast<int>(first), MPI_UINT64_T, r.peer, r.tag, p2p_, &reqs_[kSend]),
          "MPI_Isend(agreement check)");
    if (state_.size() > first)
      check(MPI_Isend(state_.data() + first, static_cast<int>(state_.size() - first), MPI_UINT64_T, r.peer, r.tag,
                      p2p_, &reqs_[kSendSecond]),
            "MPI_Isend(agreement check, second fragment)");
  }
  if (r.recv) {
    check(MPI_Irecv(in_.get(), static_cast<int>(kInWords), MPI_UINT64_T, r.peer, r.tag, p2p_, &reqs_[kRecv]),
          "MPI_Irecv(agreement check)");
    // A partner in the same average sends a message of this rank's size: where that has two
    // fragments, the second one's receive is posted now too (MPI matches the two in order),
    // and whole() cancels it if the partner's message turns out to be whole in one.
    early_at_ = first_fragment(state_.size());
    if (state_.size() > early_at_)
      check(MPI_Irecv(in_.get() + early_at_, static_cast<int>(kInWords - early_at_), MPI_UINT64_T, r.peer, r.tag,
                      p2p_, &reqs_[kRecvSecond]),
            "MPI_Irecv(agreement check, second fragment)");
  }
}

bool ControlCheck::whole(const Round& r) {
  if (!r.recv || got_ > 0) return true;  // (got_ > 0: its second fragment came)
  // The sender's message is its state: the header and the payload its counts announce (a
  // state always has that size), of which first_fragment() words came first.
  const std::size_t words = kWords + payload_words(in_[kCounts]);
  if (words > kInWords) throw Error("hma: internal: an agreement check message larger than any check sends");
  got_ = words;
  const std::size_t first = first_fragment(words);
  if (reqs_[kRecvSecond] != MPI_REQUEST_NULL) {
    if (words == first) {  // whole in one fragment: the early receive will never match
      check(MPI_Cancel(&reqs_[kRecvSecond]), "MPI_Cancel(agreement check, second fragment)");
      check(MPI_Wait(&reqs_[kRecvSecond], MPI_STATUS_IGNORE), "MPI_Wait(agreement check, second fragment)");
      return true;
    }
    // Its second fragment lands where this rank's own would (a partner cut elsewhere has
    // other counts: its payload is never summed, and every cut leaves room for the rest).
    reqs_[kRecv] = reqs_[kRecvSecond];
    reqs_[kRecvSecond] = MPI_REQUEST_NULL;
    return false;
  }
  if (words == first) return true;
  check(MPI_Irecv(in_.get() + first, static_cast<int>(kInWords - first), MPI_UINT64_T, r.peer, r.tag, p2p_,
                  &reqs_[kRecv]),
        "MPI_Irecv(agreement check, second fragment)");
  return false;
}

void ControlCheck::apply(const Round& r) {
  if (!r.recv) return;
  const std::size_t words = got_;
  if (r.take) {
    state_.assign(in_.get(), in_.get() + words);
  } else {
    combine(in_.get(), words);
  }
}

}  // namespace hma::detail
