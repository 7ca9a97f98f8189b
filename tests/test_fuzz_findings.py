"""
Fuzzing findings that are fixed: empty literals (the framer now emits one
empty chunk for C{{0}}), literal octets sent with a command the filtered
relay refuses (also the rest of its line), literal data ending like a literal
announcement (it stalled the filtered relay), and POP3's pre-login timeout
during a login in flight.  The tests live with the open findings in
C{fuzz_findings_pending.py} (not collected); the fixed ones run from here.
"""

from tests.fuzz_findings_pending import (  # noqa: F401
    test_append_size_limit_holds_for_a_multiappend_starting_with_an_empty_message,
    test_filtered_relay_forwards_a_command_with_an_empty_literal_unchanged,
    test_filtered_relay_forwards_literal_data_ending_like_an_announcement_byte_for_byte,
    test_filtered_relay_forwards_traffic_with_empty_literals_byte_for_byte,
    test_filtered_relay_survives_a_refused_login_sent_with_its_literal,
    test_filtered_relay_survives_a_rejected_large_append_sent_with_its_data,
    test_filtered_relay_survives_an_empty_literal_before_a_large_one,
    test_filtered_relay_survives_arbitrary_traffic_with_every_kind_of_literal,
    test_filtered_relay_survives_the_rest_of_a_refused_commands_line_sent_with_its_literal,
    test_literal_data_ending_like_an_announcement_does_not_stall_a_literal_plus_upstream,
    test_literal_data_ending_like_an_announcement_does_not_stall_the_command,
    test_login_with_an_empty_literal_password_fails_like_a_wrong_password,
    test_pop3_autologout_is_not_sent_as_the_answer_to_a_pending_pass,
    test_response_filters_see_an_empty_literal_in_a_response,
)
from tests.test_fuzz_protocols import usersDir  # noqa: F401  (fixture)
